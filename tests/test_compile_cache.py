"""torch.compile's results in the engine cache: one compile per device type, loaded by later processes; corrupt and
mismatched entries rebuilt, never trusted (trtseg/accel/compile_cache.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from trtseg.accel.compile_cache import CompileCacheEntry, key_fields

ENGINE = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from trtseg.accel.compile_cache import CompileCacheEntry, key_fields
from trtseg.accel.torch_engine import TorchEngine
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 3, 1))
shape = (2, 1, 8, 16, 16)
entry = CompileCacheEntry(sys.argv[1], key_fields("fp-test", "0", "torch:compile", shape, torch.device("cpu")))
engine = TorchEngine(net, "cpu", compile=True, static_batch=2, compile_cache=entry)
engine.warm_up(shape)
print(json.dumps({"status": entry.status, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "describe": engine.describe()["compile_cache"]}))
"""


def _process(cache: str, inductor_dir: str) -> dict:
    """A fresh process with its own Inductor cache directory (as another machine has), compiling one engine."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir, "TRITON_INTERPRET": ""}
    r = subprocess.run([sys.executable, "-c", ENGINE, cache], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_key_holds_what_decides_the_compiled_code():
    base = key_fields("fp", "0", "torch:fp16+compile", (4, 1, 128, 128, 128), torch.device("cpu"))
    assert {"device", "torch", "triton", "cuda", "model", "fold", "engine", "input_shape", "conv_configs"} <= set(base)
    same = CompileCacheEntry("memory://c", dict(base))
    assert same.key == CompileCacheEntry("memory://c", dict(base)).key
    for change in ({"model": "other"}, {"fold": "1"}, {"engine": "torch:fp16+compile+fuse-norms"},
                   {"input_shape": [2, 1, 128, 128, 128]}, {"torch": "0.0"}, {"device": "NVIDIA_H200-sm90"}):
        assert CompileCacheEntry("memory://c", {**base, **change}).key != same.key, change


def test_a_second_process_loads_the_compile_and_bad_entries_are_rebuilt(tmp_path):
    cache = str(tmp_path / "cache")
    first = _process(cache, str(tmp_path / "ind1"))
    assert first["status"] == "saved" and first["misses"] > 0
    entry = first["describe"]["entry"]
    second = _process(cache, str(tmp_path / "ind2"))  # another machine: empty Inductor cache, same engine cache
    assert second["status"] == "loaded" and second["hits"] > 0 and second["misses"] == 0, second
    # corrupt bytes: refused, compiled again and replaced by a good entry
    good = open(entry, "rb").read()
    open(entry, "wb").write(good[: len(good) // 2])
    third = _process(cache, str(tmp_path / "ind3"))
    assert third["status"] == "rebuilt: its bytes do not match their hash" and third["misses"] > 0
    assert _process(cache, str(tmp_path / "ind4"))["status"] == "loaded"
    # an entry made for another torch (its recorded fields differ) is refused, never loaded
    meta_url = entry[: -len(".bin")] + ".json"
    meta = json.load(open(meta_url))
    meta["fields"]["torch"] = "0.0"
    json.dump(meta, open(meta_url, "w"))
    fourth = _process(cache, str(tmp_path / "ind5"))
    assert fourth["status"] == "rebuilt: made for other torch" and fourth["misses"] > 0
