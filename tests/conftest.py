"""Shared test configuration: GPU tests skip (with a reason) where CUDA is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (tests/test_kernels.py) run in Triton's interpreter on CPU. The switch must be
    # set before anything imports triton: triton.language's own helpers (tl.zeros, tl.max, ...) are
    # jit-decorated at import time, and other test modules (transformers, torch) may import it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead, and spin badly when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def essays_path() -> Path:
    """The RULER essay haystack beside the checkout (../shared/data/ruler); skips if absent."""
    path = SHARED_DATA / "ruler" / "PaulGrahamEssays.json"
    if not path.exists():
        pytest.skip(f"essay haystack not found at {path}")
    return path
