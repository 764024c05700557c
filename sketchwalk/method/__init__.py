"""The Sketch&Walk method in PyTorch: the reference implementation every kernel is tested against."""
from .attention import sparse_attention, token_mask
from .decode_state import LayerDecodeState
from .runtime import DensityReport, SketchWalkRuntime
from .scores import group_features, sketch_features, transition_rows
from .selection import BlockSelection, select_blocks
from .sketch import block_means, fwht, srht
from .walk import walk_update

__all__ = [
    "BlockSelection", "DensityReport", "LayerDecodeState", "SketchWalkRuntime", "block_means", "fwht",
    "group_features", "select_blocks", "sketch_features", "sparse_attention", "srht", "token_mask",
    "transition_rows", "walk_update",
]
