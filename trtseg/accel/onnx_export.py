"""PyTorch network -> ONNX: static or dynamic batch, optional dynamic spatial dims, FP32 or FP16, checked, and
compared with PyTorch through ONNX Runtime.

FP16 is strongly typed in the graph itself: convolutions run in float16, InstanceNormalization (a reduction over
the whole tile that loses accuracy in float16, nnU-Net issue 2874) runs in float32 between Casts, and the graph's
inputs and outputs stay float32. TensorRT's strongly typed networks (10.x, 11.x, RTX) follow those types, so no
builder precision flag is needed.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from trtseg import storage
from trtseg.errors import TrtsegError

INPUT, OUTPUT = "input", "logits"
EXTERNAL_DATA_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2  # protobuf's 2 GiB, less headroom for the graph itself


class _Float32Norm(torch.nn.Module):
    """Runs a normalization layer in float32 inside a float16 network."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x):
        return self.norm(x.float()).to(x.dtype)


class _Float16Network(torch.nn.Module):
    """float32 in, float16 inside (normalizations float32), float32 out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.half()).float()


_NORMS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm,
          torch.nn.LayerNorm)


def _keep_norms_float32(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, _NORMS):
            setattr(module, name, _Float32Norm(child))
        else:
            _keep_norms_float32(child)


class _FirstOutput(torch.nn.Module):
    """Keeps the full-resolution output of a network that still returns deep-supervision heads."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return y[0] if isinstance(y, (list, tuple)) else y


def for_precision(net: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The network as it will be exported: FP32 as is, or FP16 with normalizations kept in FP32."""
    net = _FirstOutput(net.eval())
    if precision == "fp32":
        return net.float()
    if precision == "fp16":
        half = copy.deepcopy(net).half()
        _keep_norms_float32(half)
        return _Float16Network(half).eval()
    raise ValueError(f"ONNX export precision must be fp32 or fp16 (INT8 comes from trtseg.accel.precision.quantize_int8), got {precision!r}")


@dataclass
class OnnxExport:
    """url: where the .onnx is; external_data: its weights file beside it, for models over 2 GB; sha256 of the graph."""

    url: str
    sha256: str
    size_bytes: int
    input_shape: tuple  # (b, c, z, y, x); None where dynamic
    external_data: str | None = None


def export_onnx(net: torch.nn.Module, url: str, input_channels: int, patch_size, batch: int | None = 1,
                dynamic_spatial: bool = False, precision: str = "fp32", opset: int = 17) -> OnnxExport:
    """Exports ``net`` to ``url`` and checks it with onnx.checker.

    batch: a fixed batch size, or None for a dynamic batch dimension
    dynamic_spatial: also make (z, y, x) dynamic (the network still needs sizes divisible by its strides)
    """
    import onnx

    model = for_precision(net, precision)
    example = torch.zeros((batch or 1, input_channels, *patch_size), dtype=torch.float32)
    dyn: dict[int, str] = {}
    if batch is None:
        dyn[0] = "batch"
    if dynamic_spatial:
        dyn.update({2: "z", 3: "y", 4: "x"})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter warns about InstanceNorm's training flag
            printed = os.path.join(tmp, "exporter.out")
            try:
                with _process_output_to(printed):  # on failure the exporter prints its graph: into the log
                    torch.onnx.export(model, (example,), path, input_names=[INPUT], output_names=[OUTPUT],
                                      dynamic_axes={INPUT: dyn, OUTPUT: dyn} if dyn else None, opset_version=opset,
                                      dynamo=False, do_constant_folding=True)
            except Exception as e:
                raise _export_failed(e, url, open(printed).read()) from None
        proto = onnx.load(path)
        external = None
        if proto.ByteSize() > EXTERNAL_DATA_LIMIT:
            external = os.path.basename(url) + ".data"  # the graph records this name: keep it beside the .onnx
            onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=external)
        onnx.checker.check_model(path, full_check=True)
        raw = open(path, "rb").read()
        storage.write_bytes_atomic(url, raw)
        if external:
            storage.write_bytes_atomic(storage.join(url.rsplit("/", 1)[0], external),
                                       open(os.path.join(tmp, external), "rb").read())
    shape = tuple(None if i in dyn else s for i, s in enumerate(example.shape))
    return OnnxExport(url=url, sha256=hashlib.sha256(raw).hexdigest(), size_bytes=len(raw), input_shape=shape,
                      external_data=external)


def local_copy(url: str, folder: str) -> str:
    """A local path of the ONNX file at ``url`` (with its external data file, when it has one)."""
    from fsspec.implementations.local import LocalFileSystem

    fs, path = storage.filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return path
    dest = os.path.join(folder, os.path.basename(path))
    fs.get(path, dest)
    data = path + ".data"
    if fs.exists(data):
        fs.get(data, dest + ".data")
    return dest


def onnx_session(url: str, providers: list[str] | None = None):
    """An ONNX Runtime session for the ONNX file at ``url``, with a clear error for a missing or corrupt file."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = local_copy(url, tmp)
        except FileNotFoundError:
            raise TrtsegError(f"{url}: ONNX file not found") from None
        if not os.path.exists(path):
            raise TrtsegError(f"{url}: ONNX file not found")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Q/DQ pairs run as written (quantize, dequantize, float convolution), as TensorRT's explicit quantization
        # defines them, instead of fused into ONNX Runtime's int8 kernels: on x86 CPUs without VNNI those saturate
        # their 16-bit intermediate sums, which cost a test model 0.51 Dice on an AVX2-only AMD EPYC
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        try:
            return ort.InferenceSession(path, sess_options=so, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise TrtsegError(f"{url}: not a usable ONNX model ({' '.join(str(e).split())[:300]})") from None


def compare_outputs(ref: np.ndarray, test: np.ndarray) -> dict:
    """max abs error, max relative error (max abs error over the reference's max magnitude), argmax agreement."""
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64))
    return {"max_abs_error": float(diff.max()), "max_rel_error": float(diff.max() / max(np.abs(ref).max(), 1e-12)),
            "mean_abs_error": float(diff.mean()),
            "argmax_agreement": float((ref.argmax(1) == test.argmax(1)).mean())}


def compare_with_pytorch(net: torch.nn.Module, onnx_url: str, patches: dict[str, np.ndarray]) -> dict:
    """Runs each named batch of patches (b, c, z, y, x) through PyTorch (FP32) and the ONNX graph (ONNX Runtime,
    CPU) and reports the errors per batch."""
    sess = onnx_session(onnx_url)
    ref_net = _FirstOutput(net.eval()).float()
    fixed_batch = sess.get_inputs()[0].shape[0]
    report = {}
    for name, x in patches.items():
        with torch.no_grad():
            ref = ref_net(torch.from_numpy(x)).numpy()
        if isinstance(fixed_batch, int):
            got = np.concatenate([sess.run([OUTPUT], {INPUT: x[i:i + fixed_batch]})[0]
                                  for i in range(0, x.shape[0], fixed_batch)])
        else:
            got = sess.run([OUTPUT], {INPUT: x})[0]
        report[name] = compare_outputs(ref, got)
    return report


@contextlib.contextmanager
def _process_output_to(path: str):
    """Sends this process's stdout and stderr (file descriptors 1 and 2, where PyTorch's C++ prints) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _export_failed(e: Exception, url: str, printed: str = "") -> TrtsegError:
    """One line for a failed ONNX export: the exporter's cause, with its whole message and what it printed (often
    a graph dump of hundreds of lines) in a log file beside the system's temporary files."""
    import traceback

    text = printed + "\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log = os.path.join(tempfile.gettempdir(), f"trtseg-onnx-export-{hashlib.sha256(text.encode()).hexdigest()[:8]}.log")
    with open(log, "w") as f:
        f.write(text)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if "export" in ln.lower() or "not supported" in ln.lower()), lines[0] if lines else "")
    cause = cause.split("[Caused by")[0].strip()
    return TrtsegError(f"ONNX export for {url} failed: {type(e).__name__}: {cause[:300]} (the exporter's full "
                       f"output: {log})")
