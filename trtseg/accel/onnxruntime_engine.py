"""The ONNX Runtime backend: the CPU default, and the CUDA provider where onnxruntime-gpu is installed."""
from __future__ import annotations

import torch

from trtseg.accel.engine import Engine, pad_batch


class OnnxRuntimeEngine(Engine):
    """An ONNX graph under ONNX Runtime: the CPU default; the CUDA provider when present (I/O bound to torch CUDA
    tensors, no host copies).

    onnx_url: the graph (any fsspec URL); a fixed batch dimension makes ``max_batch`` that size
    device: "cpu", or "cuda[:N]" (needs onnxruntime-gpu)
    """

    name = "onnxruntime"

    def __init__(self, onnx_url: str, device: torch.device | str = "cpu", num_classes: int | None = None):
        import onnxruntime as ort

        from trtseg.accel.onnx_export import INPUT, OUTPUT, onnx_session

        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu, or use --engine torch")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = onnx_session(onnx_url, providers)  # type: ignore[arg-type]
        self.url = onnx_url
        self.input_name, self.output_name = INPUT, OUTPUT
        b = self.session.get_inputs()[0].shape[0]
        self.max_batch = b if isinstance(b, int) else None
        out_c = self.session.get_outputs()[0].shape[1]
        self.num_classes = out_c if isinstance(out_c, int) else num_classes

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.max_batch is not None:  # a fixed-batch graph: pad the last, short batch
            batch = pad_batch(batch, self.max_batch)
        if self.device.type == "cuda":
            out = self._infer_cuda(batch.contiguous())
        else:
            out = torch.from_numpy(self.session.run([self.output_name], {self.input_name: batch.cpu().numpy()})[0])
        return out[:n]

    def _infer_cuda(self, batch: torch.Tensor) -> torch.Tensor:
        import numpy as np

        assert self.num_classes is not None, "the graph's class count must be known to bind its output"
        out = torch.empty((batch.shape[0], self.num_classes, *batch.shape[2:]), dtype=torch.float32, device=batch.device)
        binding = self.session.io_binding()
        idx = batch.device.index or 0
        binding.bind_input(self.input_name, "cuda", idx, np.float32, tuple(batch.shape), batch.data_ptr())
        binding.bind_output(self.output_name, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(batch.device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def describe(self) -> dict:
        return {"engine": self.name, "device": str(self.device), "onnx": self.url,
                "providers": self.session.get_providers()}
