"""What one `sketchwalk bench e2e` run measures, checked before anything is allocated (no torch).

Model shapes we ship (random weights, nothing downloaded), the run presets, the settings a parsed
command line resolves to, their validation (exit 2 naming the flag) and the memory estimate the
run is refused on: weights + KV cache + prefill activations, in bytes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from ..config import PRESETS as CONFIG_PRESETS

K = 1024
DEFAULT_OUT = "results/e2e/bench_e2e.json"
MAX_SEQ = 1024 * K  # a longer --seq is refused as a typo

#: LlamaConfig fields of the named shapes (the model's architecture, not its weights).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama8b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                    max_position_embeddings=131072, tie_word_embeddings=False),
    "smollm2": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True),
    # CPU smoke tests: 4 layers so that layers 2-3 are sparse under the default skip_layers = 2.
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, intermediate_size=256, vocab_size=512, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}
SHAPE_TITLES = {"llama8b": "Llama-3.1-8B shape", "smollm2": "SmolLM2-135M shape", "tiny": "tiny shape"}
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")

PRESETS = {
    "full": dict(shapes=["llama8b", "smollm2"], seq=[4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K], decode_seq=None,
                 decode_batch=[1, 8], density=[0.2, 0.1], repeats=3, warmup=1),
    "quick": dict(shapes=["smollm2"], seq=[4 * K, 16 * K], decode_seq=[16 * K], decode_batch=[1, 8],
                  density=[0.2], repeats=3, warmup=1),
    # CPU: every code path on the tiny shape (a test, not a measurement).
    "dry-run": dict(shapes=["tiny"], seq=[128, 256], decode_seq=[256], decode_batch=[1, 2], density=[0.5],
                    repeats=2, warmup=1),
}


class PlanError(ValueError):
    """A bad command line: `flag` names the option to change."""

    def __init__(self, flag: str, message: str):
        self.flag, self.message = flag, message
        super().__init__(f"{flag}: {message}")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model to build with random weights: `name` and its LlamaConfig fields."""

    name: str
    title: str
    fields: dict

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    @property
    def head_dim(self) -> int:
        return int(self.fields.get("head_dim") or self.fields["hidden_size"] // self.fields["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.fields.get("num_key_value_heads") or self.fields["num_attention_heads"])


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    """One `bench e2e` run: a preset with the explicit flags applied, validated."""

    mode: str  # full | quick | dry-run
    model: Optional[str]  # a model spec for sketchwalk.models.load; None = the shapes below
    shapes: list[ModelShape]
    seq: list[int]  # prefill lengths, tokens
    decode_seq: list[int]  # decode KV-cache lengths, tokens
    decode_batch: list[int]  # decode batch sizes (prefill is batch 1)
    density: list[float]  # SketchWalkConfig(density=d) configs
    configs: list[str]  # YAML files of further configs
    block_size: Optional[int]
    repeats: int  # timed calls per measurement (median)
    warmup: int  # untimed calls first
    explicit_sizes: bool  # --seq / --decode-seq / --batch given: a row that does not fit refuses the run
    out: Optional[str]
    seed: int
    graphs: bool = False  # also time each prefill forward replayed from one CUDA graph (CUDA only)


def load_shape(value: str) -> ModelShape:
    """A named shape or a config.json path -> ModelShape; PlanError('--shapes') otherwise."""
    if value in MODEL_SHAPES:
        return ModelShape(value, SHAPE_TITLES[value], dict(MODEL_SHAPES[value]))
    path = Path(value)
    if not path.is_file():
        raise PlanError("--shapes", f"{value!r} is neither a named shape ({', '.join(MODEL_SHAPES)}) nor a config.json file")
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError("--shapes", f"{value}: not a JSON file ({exc})") from None
    if not isinstance(fields, dict):
        raise PlanError("--shapes", f"{value}: expected a JSON object")
    missing = [f for f in _REQUIRED if not isinstance(fields.get(f), int) or fields[f] < 1]
    if missing:
        raise PlanError("--shapes", f"{value}: missing or non-positive {', '.join(missing)}")
    shape = ModelShape(path.stem if path.name != "config.json" else path.parent.name or "config", str(path), fields)
    if fields["hidden_size"] % fields["num_attention_heads"] and not fields.get("head_dim"):
        raise PlanError("--shapes", f"{value}: hidden_size is not a multiple of num_attention_heads")
    if fields["num_attention_heads"] % shape.kv_heads:
        raise PlanError("--shapes", f"{value}: num_attention_heads is not a multiple of num_key_value_heads")
    return shape


def resolve(args) -> E2ESettings:
    """Parsed flags -> E2ESettings; raises PlanError naming the flag on bad input."""
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    preset = PRESETS[mode]

    def pick(name):
        value = getattr(args, name, None)
        return preset[name] if value is None else value

    density = sorted(set(pick("density")), reverse=True)
    for d in density:
        if not 0.0 < d <= 1.0:
            raise PlanError("--density", f"{d:g} is outside (0, 1]")
    configs = list(getattr(args, "config", None) or [])
    for c in configs:
        if not Path(c).is_file() and c not in CONFIG_PRESETS:
            raise PlanError("--config", f"{c}: neither a file nor a preset ({', '.join(CONFIG_PRESETS)})")
    if getattr(args, "density", None) is None and configs:
        density = []  # --config alone: only those configs
    seq = sorted(set(pick("seq")))
    decode_seq = pick("decode_seq")
    decode_seq = seq if decode_seq is None else sorted(set(decode_seq))
    phase = getattr(args, "phase", "both")
    seq, decode_seq = (seq if phase != "decode" else []), (decode_seq if phase != "prefill" else [])
    for flag, values in (("--seq", seq), ("--decode-seq", decode_seq)):
        for n in values:
            if not 1 <= n <= MAX_SEQ:
                raise PlanError(flag, f"{n} is outside [1, {MAX_SEQ}] tokens")
    batch = sorted(set(pick("decode_batch")))
    if any(b < 1 for b in batch):
        raise PlanError("--batch", f"batch sizes must be >= 1 (got {batch})")
    repeats = args.repeats if getattr(args, "repeats", None) is not None else preset["repeats"]
    warmup = args.warmup if getattr(args, "warmup", None) is not None else preset["warmup"]
    if repeats < 1:
        raise PlanError("--repeats", f"must be >= 1 (got {repeats})")
    if warmup < 0:
        raise PlanError("--warmup", f"must be >= 0 (got {warmup})")
    model = getattr(args, "model", None)
    shapes = [] if model else [load_shape(s) for s in dict.fromkeys(pick("shapes"))]
    explicit = any(getattr(args, f, None) is not None for f in ("seq", "decode_seq", "decode_batch"))
    return E2ESettings(mode=mode, model=model, shapes=shapes, seq=seq, decode_seq=decode_seq, decode_batch=batch,
                       density=density, configs=configs, block_size=getattr(args, "block_size", None),
                       repeats=repeats, warmup=warmup, explicit_sizes=explicit, out=args.out, seed=args.seed,
                       graphs=bool(getattr(args, "graphs", False)))


# -- memory -------------------------------------------------------------------------------------

def weight_count(shape: ModelShape) -> int:
    """Parameters of a LlamaForCausalLM of this shape (embeddings, attention, MLP, norms, head)."""
    h, layers = shape.fields["hidden_size"], shape.fields["num_hidden_layers"]
    inter, vocab = shape.fields["intermediate_size"], shape.fields["vocab_size"]
    hq, hkv, d = shape.fields["num_attention_heads"], shape.kv_heads, shape.head_dim
    per_layer = h * hq * d * 2 + h * hkv * d * 2 + 3 * h * inter + 2 * h
    head = 0 if shape.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * per_layer + h + head


def kv_cache_bytes(shape: ModelShape, tokens: int, batch: int, elem_bytes: int) -> int:
    """K and V of every layer for `batch` sequences of `tokens` tokens."""
    return 2 * shape.fields["num_hidden_layers"] * shape.kv_heads * shape.head_dim * tokens * batch * elem_bytes


def activation_bytes(shape: ModelShape, tokens: int, batch: int, elem_bytes: int) -> int:
    """Peak of one layer's prefill activations (an estimate: gate, up and their product of the MLP,
    the residual stream, q/k/v/o and the attention output), for logits_to_keep=1."""
    h, inter, d = shape.fields["hidden_size"], shape.fields["intermediate_size"], shape.head_dim
    hq, hkv = shape.fields["num_attention_heads"], shape.kv_heads
    per_token = 3 * inter + 4 * h + 2 * (hq + hkv) * d
    return per_token * tokens * batch * elem_bytes


def memory_need(shape: ModelShape, tokens: int, batch: int, elem_bytes: int, decode_steps: int = 0,
                state_bytes: int = 0, prefill_rows: Optional[int] = None) -> int:
    """Bytes the run of one (length, batch) needs: weights + KV cache (+ decode steps) + activations
    (+ state_bytes: the Sketch&Walk decode state of the whole batch, for a decode row).
    prefill_rows: sequences per prefill forward (None = the batch): the activations are those of
    one such forward, plus the cache of its rows while they are copied into the batch's."""
    rows = batch if prefill_rows is None else min(prefill_rows, batch)
    chunk_cache = kv_cache_bytes(shape, tokens + decode_steps, rows, elem_bytes) if rows < batch else 0
    return (weight_count(shape) * elem_bytes + kv_cache_bytes(shape, tokens + decode_steps, batch, elem_bytes)
            + activation_bytes(shape, tokens, rows, elem_bytes) + chunk_cache + state_bytes)


def check_memory(shape: ModelShape, tokens: int, batch: int, elem_bytes: int, free_bytes: int,
                 decode_steps: int = 0, state_bytes_per_sequence: int = 0,
                 prefill_rows: Optional[int] = None) -> Optional[PlanError]:
    """None when (tokens, batch) fits in free_bytes, else the PlanError naming --batch (it would fit
    at batch 1) or --seq. state_bytes_per_sequence: the decode state a config keeps per sequence
    (`batched_decode.decode_state_bytes`; token-level scores make it GiBs at long lengths);
    prefill_rows: as `memory_need`."""
    state = state_bytes_per_sequence
    need = memory_need(shape, tokens, batch, elem_bytes, decode_steps, state * batch, prefill_rows)
    if need <= free_bytes:
        return None
    fits_alone = memory_need(shape, tokens, 1, elem_bytes, decode_steps, state) <= free_bytes
    flag = "--batch" if batch > 1 and fits_alone else "--seq"
    extra = f" + decode state {state * batch / 2 ** 30:.1f} GiB" if state else ""
    return PlanError(flag, f"{shape.name} at {tokens} tokens x batch {batch} needs about {need / 2 ** 30:.1f} GiB "
                           f"(weights {weight_count(shape) * elem_bytes / 2 ** 30:.1f} GiB + KV cache "
                           f"{kv_cache_bytes(shape, tokens + decode_steps, batch, elem_bytes) / 2 ** 30:.1f} GiB + "
                           f"activations{extra}), more than the {free_bytes / 2 ** 30:.1f} GiB free on the device")
