"""Host <-> device copies on a CPU device: no copy, the same values (the pinned GPU path is in test_gpu.py)."""
import numpy as np
import torch

from trtseg import transfer


def test_cpu_device_takes_the_array_as_it_is():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    t = transfer.to_device(a, "cpu")
    assert t.data_ptr() == a.ctypes.data  # no copy
    assert transfer.to_device(a.astype(np.int16), "cpu", torch.float32).dtype == torch.float32
    back = transfer.to_host(t.permute(2, 1, 0))
    assert back.flags.c_contiguous and np.array_equal(back, a.transpose(2, 1, 0))
