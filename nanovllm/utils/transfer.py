"""Host values to the device without making the host wait."""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, a numpy array or a CPU tensor) copied to `device` without blocking: through
    pinned memory when bound for a GPU, since a copy from pageable memory waits for the work the GPU has
    queued. (torch.tensor pins what it builds from Python values; an array or a tensor is pinned by a copy:
    torch.tensor(ndarray, pin_memory=True) raises.)"""
    pin = device.type == "cuda"
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if isinstance(values, torch.Tensor):
        host = values if dtype is None else values.to(dtype)
        host = host.pin_memory() if pin else host
    else:
        host = torch.tensor(values, dtype=dtype, pin_memory=pin)
    return host.to(device, non_blocking=True)
