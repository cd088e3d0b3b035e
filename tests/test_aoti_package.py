"""Compiled code as AOTInductor packages in the engine cache: built at a compiled engine's first batch, loaded by
later processes without TorchDynamo, corrupt and mismatched entries rebuilt, networks that cannot be packaged run
by torch.compile (trtseg/accel/aoti_package.py). On the CPU, as the product's CUDA engines do on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from trtseg.accel.aoti_package import AotiPackageEntry
from trtseg.accel.compile_cache import key_fields
from trtseg.accel.torch_engine import TorchEngine

SHAPE = (2, 1, 8, 16, 16)
FIELDS = key_fields("fp-test", "0", "torch:compile", SHAPE, torch.device("cpu"))

ENGINE = r"""
import json, sys, torch
from trtseg.accel.aoti_package import AotiPackageEntry
from trtseg.accel.compile_cache import key_fields
from trtseg.accel.torch_engine import TorchEngine
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                          torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 3, 1))
shape = (2, 1, 8, 16, 16)
entry = AotiPackageEntry(sys.argv[1], key_fields("fp-test", "0", "torch:compile", shape, torch.device("cpu")))
engine = TorchEngine(net, "cpu", compile=True, static_batch=2, package=entry)
x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
got = engine.infer(x[:1])  # a short batch: padded to the static batch the package was built for
with torch.no_grad():
    want = net(x[:1])
dynamo = "torch._dynamo" in sys.modules
engine.oom_batch_limit = 1  # after an out-of-memory halving: batches of one, which the package was not built for
halved = engine.infer(x[:1])
print(json.dumps({"status": entry.status, "dynamo_imported": dynamo,
                  "max_abs": float((got - want).abs().max()), "shape": list(got.shape),
                  "halved_max_abs": float((halved - want).abs().max()),
                  "describe": engine.describe()["package"]}))
"""


def _process(cache: str) -> dict:
    """A fresh process (its own Inductor cache directory, as another machine has) running one compiled engine."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "..", f"ind{len(os.listdir(os.path.dirname(cache)))}")}
    r = subprocess.run([sys.executable, "-c", ENGINE, cache], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_package_without_dynamo_and_bad_entries_are_rebuilt(tmp_path):
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    first = _process(cache)
    assert first["status"] == "built" and first["max_abs"] < 1e-4 and first["shape"] == [1, 3, 8, 16, 16], first
    package = first["describe"]["entry"]
    meta = json.load(open(package[: -len(".pt2")] + ".json"))
    assert meta["fields"] == FIELDS and meta["check"]["relative_error"] < 1e-4
    second = _process(cache)
    # the point of a package: no TorchDynamo (seconds of imports and tracing) in a process that loads one
    assert second["status"] == "loaded" and not second["dynamo_imported"] and second["max_abs"] < 1e-4, second
    assert second["halved_max_abs"] < 1e-4, second
    # corrupt bytes: refused, never run; the next engine builds the entry again and reports why
    good = open(package, "rb").read()
    open(package, "wb").write(good[: len(good) // 2])
    entry = AotiPackageEntry(cache, FIELDS)
    assert entry.load(torch.device("cpu")) is None and entry.status == "rebuilt: its bytes do not match their hash"
    third = _process(cache)
    assert third["status"] == "rebuilt: its bytes do not match their hash" and third["max_abs"] < 1e-4, third
    assert AotiPackageEntry(cache, FIELDS).load(torch.device("cpu")) is not None
    # an entry whose recorded fields differ (made for another torch) is refused
    meta_url = package[: -len(".pt2")] + ".json"
    meta = json.load(open(meta_url))
    meta["fields"]["torch"] = "0.0"
    json.dump(meta, open(meta_url, "w"))
    entry = AotiPackageEntry(cache, FIELDS)
    assert entry.load(torch.device("cpu")) is None and entry.status == "rebuilt: made for other torch"
    assert not entry.exists()


class _DataDependent(torch.nn.Module):
    """A network torch.export cannot trace (its control flow depends on the values), which torch.compile runs with a
    graph break."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if float(y.sum()) > 0 else y


def test_a_network_that_cannot_be_packaged_runs_compiled_and_is_not_tried_again(tmp_path):
    cache = str(tmp_path / "cache")
    fields = {**FIELDS, "model": "data-dependent"}
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    net = _DataDependent().eval()
    with torch.no_grad():
        want = net(x)
    first = TorchEngine(net, "cpu", compile=True, static_batch=2, package=AotiPackageEntry(cache, fields))
    got = first.infer(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert first.package.status.startswith("unusable: "), first.package.status
    assert first._fn is not net  # torch.compile's wrapper runs it
    meta = json.load(open(first.package.meta_url))
    assert meta["fields"] == fields and meta["unusable"] == first.package.status[len("unusable: "):]
    second = TorchEngine(net, "cpu", compile=True, static_batch=2, package=AotiPackageEntry(cache, fields))
    assert second.package.status == first.package.status  # read from the entry: no second export or build
    assert torch.allclose(second.infer(x), want, atol=1e-5)
    assert not os.path.exists(first.package.package_url)


CRASHING_LAYER = '''
import os, signal, sys
import torch
if "pytest" not in sys.modules:  # imported by the package's build process, not by the test: it dies there
    os.kill(os.getpid(), signal.SIGSEGV)


class Conv(torch.nn.Conv3d):
    pass
'''


def test_a_build_process_that_dies_leaves_the_run_on_torch_compile(tmp_path, monkeypatch):
    """Compiling and first running a package happen in a child process, so that a crash there (a GPU run died with
    SIGSEGV building one) marks the entry unusable instead of ending the run. Here the child dies importing the
    network's own layer module."""
    (tmp_path / "crashing_layer.py").write_text(CRASHING_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    import crashing_layer

    torch.manual_seed(0)
    net = torch.nn.Sequential(crashing_layer.Conv(1, 3, 3, padding=1)).eval()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = net(x)
    entry = AotiPackageEntry(str(tmp_path / "cache"), {**FIELDS, "model": "crashing"})
    engine = TorchEngine(net, "cpu", compile=True, static_batch=2, package=entry)
    assert torch.allclose(engine.infer(x), want, atol=1e-5)
    assert entry.status == "unusable: BuildFailed: the build process died (SIGSEGV)", entry.status
    assert json.load(open(entry.meta_url))["unusable"] == "BuildFailed: the build process died (SIGSEGV)"
