# Ray head / Ray GPU worker / sweep driver image for docker-compose.yml: a CUDA runtime base, a
# virtualenv with torch (installed FIRST, pinned) and then this repository (`pip install .`).
# Build context: the repository root (see deploy/worker.Dockerfile.dockerignore for what is left out).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch first: the project requires only `torch>=2.4`, so installing the project alone would let pip
# pick whatever torch is newest. The PyPI wheel for Linux x86_64 is the CUDA build (it brings its own
# CUDA libraries, so only the NVIDIA driver comes from the host). Set TORCH_INDEX_URL to e.g.
# https://download.pytorch.org/whl/cu128 to take torch from the PyTorch index instead.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev + gcc: Triton compiles a small C launcher against Python.h at first kernel launch.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app
COPY . /app
# The project (ray[tune], optuna, mlflow client, transformers, ...); torch is already satisfied, so pip
# keeps it. Then ray[default] at the SAME ray version for the dashboard and `ray start` extras.
RUN pip install . \
 && pip install "ray[default,tune]==$(python -c 'import ray; print(ray.__version__)')" \
 && python -c "import torch, ray, sketchwalk; print('torch', torch.__version__, 'ray', ray.__version__)"

# Sweep outputs (runs/) and model caches are volumes in docker-compose.yml.
CMD ["sketchwalk", "info", "--no-fetch"]
