# MLflow tracking server image for docker-compose.yml: a pinned mlflow with the PostgreSQL driver.
# Build context: deploy/ (nothing from the repository is needed).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Keep these pins in step with the mlflow the project's clients run (pyproject / .venv): the
# tracking server and its clients should share a version (same REST API, same DB schema).
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
 && groupadd --system mlflow && useradd --system --gid mlflow --home-dir /home/mlflow --create-home mlflow \
 && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# The real command (backend store, artifact destination, host, workers) comes from docker-compose.yml.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
