"""Triton kernels for Sketch&Walk block-sparse attention (method.md step 9 and Algorithm 2).

Importing this package never imports Triton: each kernel is compiled on its first call, so
`import sketchwalk.kernels` works on machines without Triton (calling a kernel there raises
`TritonUnavailableError`), and `TRITON_INTERPRET=1` set before the first call is honoured.

- `block_sparse_prefill`: causal prefill attention over the selected key blocks of each query block.
- `block_sparse_decode`: one query token per sequence over selected KV-cache blocks (split-KV).
- `block_sketch`: the fused mean_qk selection front end (head average, block means, SRHT) in one pass.
- `block_logsumexp`: sub-block block scores reduced to per-block log-sum-exps (no [rows, nf] logits).
"""
from ._triton import TritonUnavailableError, triton_available
from .block_lse import block_logsumexp, block_logsumexp_reference
from .block_sketch import BlockSketch, block_sketch
from .block_sparse_decode import block_sparse_decode
from .block_sparse_prefill import block_sparse_prefill

__all__ = ["block_sparse_prefill", "block_sparse_decode", "block_sketch", "BlockSketch", "block_logsumexp", "block_logsumexp_reference", "TritonUnavailableError",
           "triton_available"]
