"""TensorRT's Python module, imported on first use.

``trt`` below is a stand-in that imports ``tensorrt`` (10.x or 11.x) the first time an attribute is read, or, where
only it is installed, ``tensorrt_rtx`` (TensorRT for RTX, the same builder API). Code written against ``trt``
therefore imports on machines without TensorRT and fails with a clear message only when TensorRT is used.
Type checkers see the real ``tensorrt`` module (tensorrt-stubs).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from trtseg.errors import TrtsegError

CANDIDATES = ("tensorrt", "tensorrt_rtx")
_loaded: ModuleType | None = None


def load() -> ModuleType:
    """The TensorRT module: $TRTSEG_TENSORRT_MODULE if set, else tensorrt, else tensorrt_rtx."""
    global _loaded
    if _loaded is not None:
        return _loaded
    wanted = os.environ.get("TRTSEG_TENSORRT_MODULE")
    reasons = []
    for name in ([wanted] if wanted else CANDIDATES):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # ImportError, or a library that fails to load
            reasons.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "Builder"):  # e.g. only tensorrt-stubs' .pyi files: a namespace package, no library
            reasons.append(f"{name}: imports but has no Builder (type stubs only?)")
            continue
        major = int(str(getattr(mod, "__version__", "0")).split(".")[0])
        if name == "tensorrt" and major < 10:
            raise TrtsegError(f"TensorRT {mod.__version__} is too old: trtseg needs TensorRT 10 or 11")
        _loaded = mod
        return mod
    raise TrtsegError("TensorRT is not available (" + "; ".join(reasons) + "). Install it with "
                      "pip install 'trtseg[tensorrt]' (TensorRT 10/11), or tensorrt-rtx for RTX GPUs")


def available() -> bool:
    try:
        load()
        return True
    except TrtsegError:
        return False


def module_name() -> str:
    return load().__name__


def is_rtx() -> bool:
    return module_name() == "tensorrt_rtx"


def version() -> str:
    return str(load().__version__)


def shape_of(dims: "trt.Dims") -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (-1 where dynamic)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class _Lazy:
    def __getattr__(self, name: str) -> Any:
        return getattr(load(), name)


if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = _Lazy()
