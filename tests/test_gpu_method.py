"""The reference method on a CUDA GPU: same results as on the CPU, in fp32/bf16/fp16 (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from sketchwalk import SketchWalkConfig, SketchWalkRuntime

pytestmark = pytest.mark.gpu


def _run(cfg, q, k, v, layers=3):
    rt = SketchWalkRuntime(cfg)
    rt.keep_selections = True
    outs = []
    for layer in range(layers):
        outs.append(rt.attention(layer, q, k, v, None, q.shape[-1] ** -0.5))
    return outs, rt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_fp32(dtype):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(1, 9, 1000, 64, generator=g)
    k = torch.randn(1, 3, 1000, 64, generator=g)
    v = torch.randn(1, 3, 1000, 64, generator=g)
    cfg = SketchWalkConfig(block_size=64, sketch_dim=32, density=0.3, skip_layers=1)
    ref, rt_cpu = _run(cfg, q, k, v)
    out, rt_gpu = _run(cfg, q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for layer, (a, b) in enumerate(zip(ref, out)):
        rel = (b.float().cpu() - a).norm() / a.norm()
        assert rel < tol, (layer, dtype, rel.item())
    # The selection math runs in fp32 on both devices; low-precision inputs may flip near-ties only.
    sel_cpu = rt_cpu.last_selection[2][0].dense_block_mask(16)
    sel_gpu = rt_gpu.last_selection[2][0].dense_block_mask(16).cpu()
    agreement = (sel_cpu == sel_gpu).float().mean().item()
    assert agreement > (0.999 if dtype == torch.float32 else 0.95)
