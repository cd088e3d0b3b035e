"""TensorRT through pycuda, for deployments without torch on the GPU: page-locked host buffers, device buffers,
one stream and one execution context, as the seed project ran its engines. Tensors in and out live on the host.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trtseg.accel.engine import Engine
from trtseg.accel.trt_api import shape_of, trt
from trtseg.errors import TrtsegError


class PyCudaEngine(Engine):
    name = "pycuda"

    def __init__(self, engine_bytes: bytes, device_index: int = 0):
        try:
            import pycuda.driver as cuda  # type: ignore[import-not-found]
        except ImportError:
            raise TrtsegError("pycuda is not installed: pip install 'trtseg[pycuda]'") from None
        cuda.init()
        self._cuda: Any = cuda
        self._ctx = cuda.Device(device_index).retain_primary_context()  # the context torch/ORT share
        self._ctx.push()
        self.device = torch.device("cpu")
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise TrtsegError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        shape = shape_of(engine.get_tensor_shape(self.input_name))
        self.max_batch = shape_of(engine.get_tensor_profile_shape(self.input_name, 0)[2])[0] if shape[0] == -1 else int(shape[0])
        full = (self.max_batch, *shape[1:])
        self.context.set_input_shape(self.input_name, trt.Dims(list(full)))
        out_shape = shape_of(self.context.get_tensor_shape(self.output_name))
        self.stream = cuda.Stream()
        self.host_in = cuda.pagelocked_empty(full, np.float32)
        self.host_out = cuda.pagelocked_empty(out_shape, np.float32)
        self.dev_in = cuda.mem_alloc(self.host_in.nbytes)
        self.dev_out = cuda.mem_alloc(self.host_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self.dev_in))
        self.context.set_tensor_address(self.output_name, int(self.dev_out))
        self._ctx.pop()

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        self._ctx.push()
        try:
            self.host_in[:n] = batch.detach().cpu().numpy()
            self.host_in[n:] = 0
            self._cuda.memcpy_htod_async(self.dev_in, self.host_in, self.stream)
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self._cuda.memcpy_dtoh_async(self.host_out, self.dev_out, self.stream)
            self.stream.synchronize()
            return torch.from_numpy(np.array(self.host_out[:n]))
        finally:
            self._ctx.pop()

    def close(self) -> None:
        self.dev_in.free()
        self.dev_out.free()
        self._ctx.detach()
