"""Network rewrites of the PyTorch engine: the same function in fewer GPU passes or on wider tensor-core tiles.

Each is imported only when an engine asks for it (``EngineSpec.rewrites``), so an engine without them never
imports Triton nor reads a variable that tunes its kernels:

- ``upsample_merge``: each decoder stage's transposed convolution merged into the convolution after it;
- ``conv_fold``: the 32-channel 3x3x3 convolutions computed width-folded;
- ``norm_fusion`` (with its kernels in ``triton_fusion``): InstanceNorm + LeakyReLU fused into the
  full-resolution convolutions, the first block and the head;
- ``conv8``: calibrated convolutions on fp8 or int8 tensor cores (the 8-bit precisions of ``trtseg.accel.quant8``;
  measured by ``benchmarks/conv8_throughput.py``, not yet an engine option).
"""
