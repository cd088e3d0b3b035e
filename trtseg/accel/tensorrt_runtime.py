"""A TensorRT engine behind the Engine interface, written to the TensorRT 10.x / 11.x runtime API.

One execution context and one CUDA stream per engine object (so per Ray actor), for its whole life. Inputs and
outputs are torch CUDA tensors whose addresses are handed to TensorRT with ``set_tensor_address``; the engine runs
with ``execute_async_v3`` on the engine's stream, and the logits stay on the GPU for aggregation. Optional CUDA
graph capture replays the whole enqueue at the profile's largest batch (shorter batches are padded).
"""
from __future__ import annotations

from typing import Any

import torch

from trtseg.accel.engine import Engine
from trtseg.accel.trt_api import shape_of, trt
from trtseg.errors import TrtsegError

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT8": torch.int8, "BOOL": torch.bool}


class TensorRTEngine(Engine):
    """engine_bytes: a serialized engine (from ``trtseg.accel.tensorrt_build``); device: its CUDA device."""

    name = "tensorrt"

    def __init__(self, engine_bytes: bytes, device: torch.device | str = "cuda", cuda_graphs: bool = False):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise TrtsegError("the TensorRT engine runs on a CUDA device")
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise TrtsegError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
        self.engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise TrtsegError("TensorRT could not create an execution context (out of GPU memory?)")
        self.context = context
        self.stream = torch.cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise TrtsegError(f"engine has inputs {inputs} and outputs {outputs}; one of each is expected")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.output_dtype = _TORCH_DTYPES[engine.get_tensor_dtype(self.output_name).name]
        shape = shape_of(engine.get_tensor_shape(self.input_name))
        self.max_batch: int
        if shape[0] == -1:
            self.max_batch = shape_of(engine.get_tensor_profile_shape(self.input_name, 0)[2])[0]
        else:
            self.max_batch = int(shape[0])
        self.input_shape = shape
        self.cuda_graphs = cuda_graphs
        self._graph: Any = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None

    def _enqueue(self, x: torch.Tensor) -> torch.Tensor:
        self.context.set_input_shape(self.input_name, trt.Dims(list(x.shape)))
        out = torch.empty(shape_of(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out

    def _capture(self, example: torch.Tensor) -> None:
        self._static_in = example.clone()
        with torch.cuda.stream(self.stream):
            self._static_out = self._enqueue(self._static_in)  # one run before capture, as TensorRT asks
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._static_out = self._enqueue(self._static_in)
        self._graph = graph

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        x = batch.to(self.device, torch.float32).contiguous()
        fixed = self.input_shape[0] != -1
        if (fixed or self.cuda_graphs) and n < self.max_batch:
            x = torch.cat([x, x.new_zeros((self.max_batch - n, *x.shape[1:]))])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.cuda_graphs:
            if self._graph is None:
                self._capture(x)
            assert self._static_in is not None and self._static_out is not None
            with torch.cuda.stream(self.stream):
                self._static_in.copy_(x)
                self._graph.replay()
                out = self._static_out.clone()
        else:
            with torch.cuda.stream(self.stream):
                out = self._enqueue(x)
        x.record_stream(self.stream)
        out.record_stream(self.stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out[:n].float()

    def describe(self) -> dict:
        from trtseg.accel.trt_api import module_name, version

        return {"engine": self.name, "device": str(self.device), "tensorrt": f"{module_name()} {version()}",
                "max_batch": self.max_batch, "cuda_graphs": self.cuda_graphs}
