"""Token-space and feature-space sketches: block means and the SRHT (method.md steps 2-4)."""
from __future__ import annotations

import functools
import math

import torch


def block_sums(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of each `block_size`-token block along dim -2 (a partial last block sums its real tokens).

    x: [..., n, d] -> [..., ceil(n / block_size), d]; block_size 1 returns x itself (no pass over it).
    """
    if block_size == 1:
        return x
    n = x.shape[-2]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (nb, block_size)).sum(-2)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each `block_size`-token block along dim -2; a partial last block averages its real tokens.

    x: [..., n, d] -> [..., ceil(n / block_size), d]
    """
    if block_size == 1:  # token-level keys: each mean is its one token (x / 1 == x)
        return x
    sums = block_sums(x, block_size)
    nb, last = sums.shape[-2], x.shape[-2] - (sums.shape[-2] - 1) * block_size
    return sums / _block_counts(nb, block_size, last, sums.device, sums.dtype)[:, None]


@functools.lru_cache(maxsize=64)
def _block_counts(nb: int, block_size: int, last: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Tokens per block [nb]: block_size, the last one `last` (cached: built by two launches, reused per layer)."""
    counts = torch.full((nb,), float(block_size), device=device, dtype=dtype)
    counts[-1] = last
    return counts


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform over the last dim (a power of two): x: [..., p] -> [..., p].

    Orthonormal (H / sqrt(p)), so norms and inner products are preserved.
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {p}")
    # Butterfly stage h maps each pair (a, b) = (y[j], y[j + h]) to (a + b, a - b). One launch per
    # stage: a + b * [1, -1] broadcast over the pair axis. b * ±1 is exact, so each output is
    # a ± b rounded once, the same bits as separate additions and subtractions.
    pair_signs = _pair_signs(x.device, x.dtype)
    y = x.reshape(-1, p)  # native view calls only below: this runs per layer and decode step
    h = 1
    while h < p:
        a, b = y.view(-1, p // (2 * h), 2, h).chunk(2, dim=2)
        y = torch.addcmul(a, b, pair_signs)
        h *= 2
    return y.view(x.shape) / math.sqrt(p)


@functools.lru_cache(maxsize=16)
def _pair_signs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[[1], [-1]]: the signs of the butterfly outputs (cached per device: no host-to-device copy per call)."""
    return torch.tensor([[1.0], [-1.0]], dtype=dtype).to(device)


def _next_pow2(d: int) -> int:
    return 1 << (d - 1).bit_length()


@functools.lru_cache(maxsize=512)
def _srht_params_cpu(head_dim: int, sketch_dim: int, seed: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = _next_pow2(head_dim)
    # A per-(seed, layer) generator: the sketch is fixed per layer and reproducible across runs.
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    signs = torch.randint(0, 2, (p,), generator=g).mul_(2).sub_(1).to(torch.float64)
    coords = torch.randperm(p, generator=g)[:sketch_dim].sort().values
    return signs, coords


def srht_params(head_dim: int, sketch_dim: int, seed: int, layer_idx: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ±1 signs [p] and the kept coordinate indices [sketch_dim] for one layer (p = head_dim padded to 2^k)."""
    return _srht_params_on(head_dim, sketch_dim, seed, layer_idx, torch.device(device), dtype)


@functools.lru_cache(maxsize=1024)
def _srht_params_on(head_dim: int, sketch_dim: int, seed: int, layer_idx: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per (layer, device, dtype): a host-to-device copy per call would synchronise the GPU.
    signs, coords = _srht_params_cpu(head_dim, sketch_dim, seed, layer_idx)
    return signs.to(device=device, dtype=dtype), coords.to(device=device)


def srht(x: torch.Tensor, sketch_dim: int, seed: int, layer_idx: int) -> torch.Tensor:
    """Subsampled randomised Hadamard transform: x: [..., d] -> [..., sketch_dim].

    y = sqrt(p / r) * S H D pad(x): unbiased for inner products, E[srht(x) . srht(z)] = x . z.
    """
    d = x.shape[-1]
    p = _next_pow2(d)
    if sketch_dim > p:
        raise ValueError(f"sketch_dim = {sketch_dim} exceeds head_dim = {d} (padded to {p})")
    signs, coords = srht_params(d, sketch_dim, seed, layer_idx, x.device, x.dtype)
    if p != d:
        x = torch.nn.functional.pad(x, (0, p - d))
    y = fwht(x * signs)
    if sketch_dim == p:  # all coordinates kept, in order (coords == arange(p)), scale 1: both are no-ops
        return y
    return y.index_select(-1, coords) * math.sqrt(p / sketch_dim)


@functools.lru_cache(maxsize=1024)
def sketch_matrix(head_dim: int, sketch_dim: int, seed: int, layer_idx: int, device: torch.device) -> torch.Tensor:
    """The layer's SRHT as a matrix: [head_dim, sketch_dim] fp32 with srht(x) == x @ M (up to rounding),
    what the fused Triton front end (`kernels.block_sketch`) multiplies by.

    Built in fp64 by `srht` applied to the identity (its rows are the images of the basis vectors),
    then rounded once to fp32; cached per (layer, device): one host-to-device copy.
    """
    eye = torch.eye(head_dim, dtype=torch.float64)
    return srht(eye, sketch_dim, seed, layer_idx).to(device=device, dtype=torch.float32).contiguous()
