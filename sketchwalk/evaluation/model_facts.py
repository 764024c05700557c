"""What an evaluation needs to know about a model before loading its weights: its context length
and an identity for caching results (path, size and mtime of its files)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

from ..models import ResolvedModel

# GGUF metadata value types (gguf spec): scalar sizes in bytes; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelFactsError(ValueError):
    """The model's config cannot be read (bad config.json, not a GGUF file, ...)."""


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ModelFactsError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == 8:
        n = _read(f, "<Q")
        raw = f.read(n)
        return raw.decode("utf-8", "replace") if keep else None
    if vtype == 9:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _GGUF_SCALARS:  # fixed-size elements: skip in one seek
            f.seek(struct.calcsize(_GGUF_SCALARS[etype]) * count, 1)
        else:
            for _ in range(count):
                _read_value(f, etype, False)
        return None
    raise ModelFactsError(f"unknown GGUF value type {vtype}")


def gguf_metadata(path: str | Path, wanted: tuple[str, ...] = ()) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file, read from its header only (no tensors).

    Far cheaper than transformers' AutoConfig(gguf_file=...) (~0.1 s vs ~8 s for SmolLM2),
    which parses every tensor descriptor. Array values (the vocabulary) are skipped. `wanted`,
    if given, stops reading once all those keys are found.
    """
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFactsError(f"{path} is not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version < 2:
            raise ModelFactsError(f"{path}: GGUF version {version} is not supported")
        _read(f, "<Q")  # tensor count
        for _ in range(_read(f, "<Q")):
            key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            value = _read_value(f, _read(f, "<I"), True)
            if value is not None:
                out[key] = value
            if wanted and all(k in out for k in wanted):
                break
    return out


def context_length(resolved: ResolvedModel) -> Optional[int]:
    """The model's context in tokens (max_position_embeddings), without loading weights; None if unknown.

    GGUF (bundled or local file): '<arch>.context_length' from the header; HF directory: config.json
    (text_config for multimodal configs).
    """
    if resolved.gguf_file:
        path = resolved.file
        meta = gguf_metadata(path, ("general.architecture",))
        arch = meta.get("general.architecture")
        if arch is None:
            return None
        value = gguf_metadata(path, (f"{arch}.context_length",)).get(f"{arch}.context_length")
        return int(value) if value else None
    cfg = _hf_text_config(resolved)
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _hf_text_config(resolved: ResolvedModel) -> dict[str, Any]:
    """The HF directory's config.json (its text_config for multimodal configs); {} if not a dict."""
    cfg_path = Path(resolved.path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFactsError(f"cannot read model config {cfg_path}: {e}") from e
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    return cfg if isinstance(cfg, dict) else {}


def model_shape(resolved: ResolvedModel) -> Optional[tuple[int, int]]:
    """(num_layers, head_dim) of the model without loading weights; None if the header or config
    does not say. GGUF: '<arch>.block_count' and '<arch>.attention.key_length' (else
    embedding_length / head_count); HF directory: config.json (text_config for multimodal)."""
    if resolved.gguf_file:
        meta = gguf_metadata(resolved.file)  # the whole header: ~0.03 s, arrays are skipped
        arch = meta.get("general.architecture")
        layers, heads, width = (meta.get(f"{arch}.{k}") for k in
                                ("block_count", "attention.head_count", "embedding_length"))
        head_dim = meta.get(f"{arch}.attention.key_length")
        if head_dim is None and heads and width:
            head_dim = int(width) // int(heads)
        return (int(layers), int(head_dim)) if layers and head_dim else None
    cfg = _hf_text_config(resolved)
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    return (int(layers), int(head_dim)) if isinstance(layers, int) and head_dim else None


def model_identity(resolved: ResolvedModel) -> dict[str, Any]:
    """{name, files: [[path, size bytes, mtime ns], ...]}: changes when any weight/config file does.

    Size + mtime instead of a content hash: hashing gigabytes of weights on every evaluation
    would cost more than a small model's whole run; rewriting a file changes its mtime.
    """
    if resolved.gguf_file:
        files = [resolved.file]
    else:
        root = Path(resolved.path)
        files = sorted(p for p in root.iterdir() if p.is_file() and
                       (p.suffix in _WEIGHT_SUFFIXES or p.suffix == ".json" or p.name.startswith("tokenizer")))
    entries = []
    for p in files:
        st = Path(p).stat()
        entries.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return {"name": resolved.name, "files": entries}
