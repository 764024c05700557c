"""Wall-clock timing that is honest on asynchronous devices."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timer(device: torch.device) -> Iterator[list[float]]:
    """Measures seconds of the enclosed block, synchronising the device before and after: yields [elapsed]."""
    box = [0.0]
    synchronize(device)
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        synchronize(device)
        box[0] = time.perf_counter() - t0
