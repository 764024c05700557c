"""Lazy Triton access shared by the kernels: nothing here imports Triton at module import time."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


class TritonUnavailableError(ImportError):
    """Raised when a kernel is called but Triton cannot be imported."""


def triton_available() -> bool:
    """True if Triton is installed (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def require_triton():
    """Import and return (triton, triton.language), or raise a clear `TritonUnavailableError`."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise TritonUnavailableError(
            "sketchwalk.kernels needs Triton (pip install triton on Linux); use the reference "
            "sketchwalk.method.attention.sparse_attention where Triton is unavailable") from exc
    return triton, tl


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (TRITON_INTERPRET=1): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels need CUDA tensors, except under the interpreter, which runs on CPU tensors."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device; got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (got {dev}); set TRITON_INTERPRET=1 before the "
                         "first kernel call to run them (slowly) on CPU")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact 'ieee' for fp32 inputs (Triton's default would be TF32); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the property query is slow per call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def as_int32(x, device, name: str) -> torch.Tensor:
    """Contiguous int32 version of an index tensor (or list) on `device` (no copy when it already is one)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.int32 and x.device == device and x.is_contiguous():
        return x  # the common case: skip three dispatches, decode is launch-overhead bound
    t = torch.as_tensor(x, device=device)
    if t.dtype.is_floating_point:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def check_common_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Checks both launchers share: GQA head ratio, dtype, head_dim, block size and device.

    q: [B, Hq, *, d]; k, v: [B, Hkv, *, d] (shapes already matched by the caller).
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d != next_pow2(d) or not 16 <= d <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be 16, 32, 64 or 128, got {block_size}")
    check_device(q, k, v)
