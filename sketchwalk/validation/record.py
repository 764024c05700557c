"""Record post-RoPE Q, K, V of a model's attention layers from one prefill per prompt.

Layout of a recording directory:
  meta.json                       model facts + one entry per (prompt, layer)
  p{prompt:03d}_l{layer:03d}.safetensors   tensors q: [heads, n, d], k, v: [kv_heads, n, d]
The tensors are what the registered attention function receives (after RoPE, before any
kernel), so a replay sees exactly the attention inputs of the dense model.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..model_shape import model_shape

META_FILE = "meta.json"
FORMAT = 1
DEFAULT_MAX_BYTES = 2 * 1024 ** 3

Prompt = Union[str, Sequence[int], torch.Tensor]


class RecordSizeError(ValueError):
    """A recording would exceed its byte limit; `estimate` and `limit` are in bytes."""

    def __init__(self, estimate: int, limit: int):
        self.estimate, self.limit = estimate, limit
        super().__init__(f"recording would take about {_gb(estimate)} ({estimate} bytes), above the limit of "
                         f"{_gb(limit)} ({limit} bytes); record fewer layers/heads/prompts, raise the limit "
                         f"(--max-gb) or force it (--force)")


def _gb(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One recorded (prompt, layer): `length` tokens, `scale` the softmax scale, `file` relative to the directory."""

    prompt: int
    layer: int
    length: int
    scale: float
    file: str


@dataclasses.dataclass
class Recording:
    """A recording directory: its meta.json fields and the (prompt, layer) entries, in prompt-then-layer order."""

    path: Path
    meta: dict[str, Any]
    entries: list[Entry]

    @property
    def layers(self) -> list[int]:
        """Recorded layer indices, ascending."""
        return list(self.meta["layers"])

    @property
    def prompts(self) -> list[int]:
        """Recorded prompt indices (0-based, in recording order)."""
        return sorted({e.prompt for e in self.entries})

    def entry(self, prompt: int, layer: int) -> Entry:
        """The entry of one (prompt, layer); KeyError if it was not recorded."""
        for e in self.entries:
            if e.prompt == prompt and e.layer == layer:
                return e
        raise KeyError(f"no recording of prompt {prompt}, layer {layer} in {self.path}")

    def load(self, prompt: int, layer: int, device: Union[str, torch.device] = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q: [heads, n, d], k: [kv_heads, n, d], v: [kv_heads, n, d]) of one prompt and layer."""
        from safetensors.torch import load_file

        t = load_file(str(self.path / self.entry(prompt, layer).file), device=str(device))
        return t["q"], t["k"], t["v"]


def load_recording(path: Union[str, Path]) -> Recording:
    """Read a recording directory's meta.json (FileNotFoundError / ValueError if it is not one)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a tensor recording: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported recording format {meta.get('format')!r} (expected {FORMAT})")
    entries = [Entry(**e) for e in meta.pop("entries")]
    return Recording(path, meta, entries)


def _model_facts(model) -> dict[str, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    num_layers, head_dim = model_shape(cfg)
    return {"num_layers": num_layers, "num_heads": heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads, "head_dim": head_dim}


def _pick(values: Optional[Sequence[int]], n: int, what: str) -> list[int]:
    if values is None:
        return list(range(n))
    picked = sorted(set(int(v) for v in values))
    bad = [v for v in picked if not 0 <= v < n]
    if bad or not picked:
        raise ValueError(f"{what} {bad or list(values)} invalid: allowed a non-empty subset of 0..{n - 1}")
    return picked


def estimate_bytes(lengths: Sequence[int], n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of a recording: per prompt of n tokens and layer, q (n_heads) + k, v (n_kv_heads each) x n x head_dim."""
    per_token = (n_heads + 2 * n_kv_heads) * head_dim * torch.empty((), dtype=dtype).element_size()
    return sum(lengths) * n_layers * per_token


def _token_ids(tokenizer, prompt: Prompt) -> torch.Tensor:
    """[1, n] int64. Text is encoded without special tokens: prompts are the full text as evaluation
    feeds it (RULER prompts already carry the chat template)."""
    if isinstance(prompt, str):
        return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.as_tensor(prompt, dtype=torch.long)
    return ids.view(1, -1)


def answer_annotation(tokenizer, prompt: str, answers: Sequence[str], answer_start: Optional[int] = None
                      ) -> dict[str, Any]:
    """Where a RULER prompt holds its answers, in token positions of `prompt` (encoded as `collect` does).

    answers: the reference strings; answer_start: the character offset where an appended answer
    begins (its tokens are the "answer" rows of a teacher-forced decode), or None.
    Returns {"needles": [[start, end), ...] token spans of each answer's occurrences before
    answer_start, "answer_tokens": [start, end) or None}. Needs a fast tokenizer (offset mapping).
    """
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    limit = len(prompt) if answer_start is None else answer_start

    def tokens_of(c0: int, c1: int) -> list[int]:
        hit = [t for t, (a, b) in enumerate(offsets) if a < c1 and b > c0]
        return [hit[0], hit[-1] + 1] if hit else []

    needles = []
    for ans in answers:
        for m in re.finditer(re.escape(ans), prompt[:limit]):
            span = tokens_of(m.start(), m.end())
            if span and span not in needles:
                needles.append(span)
    answer_tokens = tokens_of(answer_start, len(prompt)) if answer_start is not None else None
    return {"needles": sorted(needles), "answer_tokens": answer_tokens or None}


class _StopForward(Exception):
    """Raised after the deepest recorded layer: the rest of the forward pass is not needed."""


def collect(model, tokenizer, prompts: Sequence[Prompt], out_dir: Union[str, Path], *,
            layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None,
            max_bytes: int = DEFAULT_MAX_BYTES, force: bool = False, model_name: str = "",
            progress: bool = True, annotations: Optional[Sequence[dict[str, Any]]] = None) -> Recording:
    """Record post-RoPE Q, K, V from one dense prefill forward per prompt.

    prompts: text (encoded without special tokens) or token ids; layers: layer indices (default
    all); heads: query-head indices (default all) — their KV heads are recorded with them.
    The size is estimated before anything runs; above `max_bytes` (bytes) it raises
    RecordSizeError naming the estimate and the limit, unless `force`. Tensors are written as they
    are produced (one safetensors file per prompt and layer), so memory holds one layer at a time.
    The model must run dense attention (a model with SketchWalk attached would record the inputs
    its sparse layers produce, not the dense model's): ValueError otherwise.
    annotations: one JSON-able dict per prompt, stored as meta["annotations"] (e.g. `answer_annotation`'s
    answer spans, which the selector study reads).
    Returns the Recording (meta.json written last, so a partial directory is never mistaken for a whole one).
    """
    if annotations is not None and len(annotations) != len(prompts):
        raise ValueError(f"annotations: {len(annotations)} given for {len(prompts)} prompts (one per prompt)")
    facts = _model_facts(model)
    layer_ids = _pick(layers, facts["num_layers"], "layers")
    head_ids = _pick(heads, facts["num_heads"], "heads")
    group = facts["num_heads"] // facts["num_kv_heads"]
    kv_ids = sorted({h // group for h in head_ids})
    q_to_kv = [kv_ids.index(h // group) for h in head_ids]
    if model.config._attn_implementation == "sketchwalk":
        raise ValueError("collect records the dense model's attention inputs: detach SketchWalk first")
    dtype = next(model.parameters()).dtype
    encoded = [_token_ids(tokenizer, p) for p in prompts]
    estimate = estimate_bytes([ids.shape[-1] for ids in encoded], len(layer_ids), len(head_ids), len(kv_ids),
                              facts["head_dim"], dtype)
    if estimate > max_bytes and not force:
        raise RecordSizeError(estimate, max_bytes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # an earlier recording's meta must not describe this one's files
    recorder = _Recorder(out, layer_ids, head_ids, kv_ids, next(model.parameters()).device)
    with _tapped_attention(model, recorder), _progress(progress, len(encoded)) as advance, torch.no_grad():
        for p, ids in enumerate(encoded):
            recorder.prompt = p
            try:
                model(input_ids=ids.to(recorder.device), use_cache=False)
            except _StopForward:
                pass
            advance()

    meta = {"format": FORMAT, "model": model_name or getattr(model.config, "_name_or_path", "") or "",
            **facts, "dtype": str(dtype).removeprefix("torch."), "layers": layer_ids, "heads": head_ids,
            "kv_heads": kv_ids, "q_to_kv": q_to_kv, "prompts": len(encoded), "bytes": estimate,
            "entries": [dataclasses.asdict(e) for e in recorder.entries]}
    if annotations is not None:
        meta["annotations"] = list(annotations)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return load_recording(out)


class _Recorder:
    """The attention function installed while recording: saves the wanted layers' Q, K, V (batch
    row 0, the selected heads), then calls the original function; stops the forward pass after
    the deepest wanted layer."""

    def __init__(self, out: Path, layers: list[int], heads: list[int], kv_heads: list[int], device):
        self.out, self.device = out, device
        self.wanted, self.last = set(layers), max(layers)
        self.heads = torch.tensor(heads, device=device)
        self.kv_heads = torch.tensor(kv_heads, device=device)
        self.prompt = 0
        self.entries: list[Entry] = []
        self.original = None  # set by _tapped_attention

    def __call__(self, module, query, key, value, *args, **kwargs):
        from safetensors.torch import save_file

        layer = int(module.layer_idx)
        if layer in self.wanted:
            file = f"p{self.prompt:03d}_l{layer:03d}.safetensors"
            save_file({"q": query[0].index_select(0, self.heads).contiguous(),
                       "k": key[0].index_select(0, self.kv_heads).contiguous(),
                       "v": value[0].index_select(0, self.kv_heads).contiguous()}, str(self.out / file))
            scale = kwargs.get("scaling")
            self.entries.append(Entry(self.prompt, layer, int(query.shape[-2]),
                                      float(scale if scale is not None else query.shape[-1] ** -0.5), file))
        if layer == self.last:
            raise _StopForward
        return self.original(module, query, key, value, *args, **kwargs)


class _tapped_attention:
    """Swap the model's registered attention function for `tap` (which gets `.original`) within a `with`.

    transformers looks the function up by `config._attn_implementation` on every forward (as
    evaluation.timing.AttentionTimer relies on too). `eager` is not looked up there, so an eager
    model runs `sdpa` while tapped (the same attention) and gets its implementation back after.
    """

    def __init__(self, model, tap):
        self.model, self.tap = model, tap
        self.previous = model.config._attn_implementation

    def __enter__(self) -> "_tapped_attention":
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.previous in (None, "eager"):
            self.model.set_attn_implementation("sdpa")
        self.name = self.model.config._attn_implementation
        self.tap.original = ALL_ATTENTION_FUNCTIONS[self.name]
        AttentionInterface.register(self.name, self.tap)
        return self

    def __exit__(self, *exc) -> None:
        from transformers import AttentionInterface

        AttentionInterface.register(self.name, self.tap.original)
        if self.name != self.previous:
            self.model.set_attn_implementation(self.previous or "eager")


class _progress:
    """A rich progress bar over prompts (or nothing); `with` yields the advance() callable."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("recording Q/K/V", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
