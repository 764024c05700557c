"""What an evaluation needs to know about a model before loading its weights: its context length
and an identity for caching results (path, size and mtime of its files)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

from ..model_shape import model_shape

from ..models import ResolvedModel

# GGUF metadata value types (gguf spec): scalar sizes in bytes; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class ModelFactsError(ValueError):
    """The model's config cannot be read (bad config.json, not a GGUF file, ...)."""


class _Header:
    """A GGUF header being read, every read bounded by the file's size: a garbage length field
    (valid magic, random bytes after it) is an error naming the file, never a huge allocation."""

    def __init__(self, f: BinaryIO, path: str | Path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def _bad(self, what: str) -> ModelFactsError:
        return ModelFactsError(f"{self.path}: corrupt or truncated GGUF header ({what} at byte {self.f.tell()}, "
                               f"file is {self.size} bytes)")

    def bytes(self, n: int, what: str = "a field") -> bytes:
        if n < 0 or n > self.size - self.f.tell():
            raise self._bad(f"{what} of {n} bytes runs past the end of the file")
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.f.tell():
            raise self._bad(f"{what} of {n} bytes runs past the end of the file")
        self.f.seek(n, 1)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.bytes(struct.calcsize(fmt), "a number"))[0]

    def string(self, keep: bool = True) -> Optional[str]:
        n = self.scalar("<Q")
        raw = self.bytes(n, "a string")
        return raw.decode("utf-8", "replace") if keep else None

    def count(self, min_item_bytes: int, what: str) -> int:
        """A count whose items take at least `min_item_bytes` each: bounded by the bytes left."""
        n = self.scalar("<Q")
        if n * min_item_bytes > self.size - self.f.tell():
            raise self._bad(f"{what} count {n} cannot fit in the rest of the file")
        return n

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype])
        if vtype == 8:
            return self.string(keep)
        if vtype == 9:
            etype = self.scalar("<I")
            if etype in _GGUF_SCALARS:  # fixed-size elements: skip in one seek
                size = struct.calcsize(_GGUF_SCALARS[etype])
                self.skip(self.count(size, "array") * size, "an array")
            else:
                for _ in range(self.count(8, "array")):  # strings / nested arrays: >= 8 bytes each
                    self.value(etype, False)
            return None
        raise self._bad(f"unknown GGUF value type {vtype}")


def _open_header(f: BinaryIO, path: str | Path) -> tuple[_Header, int]:
    """(the header reader past version and counts' start, tensor count) after the magic check."""
    h = _Header(f, path)
    if h.size < 4 or f.read(4) != b"GGUF":
        raise ModelFactsError(f"{path} is not a GGUF file (bad magic)")
    version = h.scalar("<I")
    if version < 2:
        raise ModelFactsError(f"{path}: GGUF version {version} is not supported")
    n_tensors = h.scalar("<Q")
    return h, n_tensors


def gguf_metadata(path: str | Path, wanted: tuple[str, ...] = ()) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file, read from its header only (no tensors).

    Far cheaper than transformers' AutoConfig(gguf_file=...) or gguf.GGUFReader (~0.03 s vs 2-8 s
    for SmolLM2), which parse every tensor descriptor. Array values (the vocabulary) are skipped.
    `wanted`, if given, stops reading once all those keys are found. Every length is checked
    against the file's size: ModelFactsError naming the file for a corrupt or truncated header.
    """
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        h, _ = _open_header(f, path)
        for _ in range(h.count(12, "metadata key")):  # key length (8) + value type (4) at least
            key = h.string()
            value = h.value(h.scalar("<I"), True)
            if value is not None:
                out[key] = value
            if wanted and all(k in out for k in wanted):
                break
    return out


def check_gguf_tensors(path: str | Path) -> int:
    """Check every tensor descriptor of a GGUF file against the file's size, before any weight is
    read: its data (offset + size, by its quantisation type's block size) must lie inside the file.
    Returns the tensor count; ModelFactsError naming the file and the first bad tensor otherwise (a
    truncated download would else fail deep inside the load, as a misleading reshape error)."""
    import gguf

    with open(path, "rb") as f:
        h, n_tensors = _open_header(f, path)
        alignment = 32
        for _ in range(h.count(12, "metadata key")):
            key = h.string()
            value = h.value(h.scalar("<I"), True)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        if n_tensors * 24 > h.size - f.tell():  # name length 8 + dims 4 + type 4 + offset 8 at least
            raise h._bad(f"tensor count {n_tensors} cannot fit in the rest of the file")
        tensors = []
        for _ in range(n_tensors):
            name = h.string()
            n_dims = h.scalar("<I")
            if n_dims > 8:
                raise h._bad(f"tensor {name!r} has {n_dims} dimensions")
            dims = [h.scalar("<Q") for _ in range(n_dims)]
            ttype, offset = h.scalar("<I"), h.scalar("<Q")
            tensors.append((name, dims, ttype, offset))
        data_start = -(-f.tell() // alignment) * alignment
    for name, dims, ttype, offset in tensors:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise ModelFactsError(f"{path}: tensor {name!r} has unknown GGML type {ttype}") from None
        elements = 1
        for d in dims:
            elements *= d
        end = data_start + offset + elements // block * type_size
        if end > h.size:
            raise ModelFactsError(f"{path}: tensor {name!r} needs bytes up to {end} but the file has {h.size} "
                                  f"(truncated or corrupt GGUF; download it again)")
    return len(tensors)


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


def shape_without_loading(resolved: ResolvedModel) -> Optional[tuple[int, int]]:
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
    try:
        return model_shape(_hf_text_config(resolved))
    except ValueError:
        return None


_GGUF_FIELDS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
                "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
                "head_dim": "attention.key_length", "intermediate_size": "feed_forward_length",
                "vocab_size": "vocab_size"}


def config_fields_without_loading(resolved: ResolvedModel) -> Optional[dict[str, Any]]:
    """The model's architecture as LlamaConfig fields (num_hidden_layers, hidden_size, heads, head_dim,
    intermediate_size, vocab_size: those the header or config.json gives) without loading weights, for
    memory estimates before a load; None when any of layers, width, heads, MLP width or vocab is unknown."""
    if resolved.gguf_file:
        meta = gguf_metadata(resolved.file)
        arch = meta.get("general.architecture")
        fields = {k: int(meta[f"{arch}.{g}"]) for k, g in _GGUF_FIELDS.items() if meta.get(f"{arch}.{g}")}
    else:
        fields = {k: v for k, v in _hf_text_config(resolved).items() if isinstance(v, (int, float, bool, str))}
    needed = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    return fields if all(isinstance(fields.get(k), int) and fields[k] > 0 for k in needed) else None


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
