"""Floating-point helpers shared by the reference (`method`) and the kernels (`kernels`)."""
from __future__ import annotations

import torch


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (the top 10 of fp32's 23 mantissa bits, to nearest, ties to even), as fp32.

    What the tensor cores keep of an fp32 operand; `kernels.block_lse` applies the same integer
    rounding in-kernel, bit for bit. Infinities and NaNs pass through; a value that rounds past the
    largest finite one becomes inf. x: any shape, any float dtype (computed in fp32).
    """
    bits = x.float().contiguous().view(torch.int32)
    keep = ~((bits >> 23) & 0xFF).eq(0xFF)  # exponent all ones: inf / NaN, left alone
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return torch.where(keep, rounded, bits).view(torch.float32)
