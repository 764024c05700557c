"""Dense baselines cached on disk, so a sweep evaluates dense attention once per setup.

An entry is keyed by (model identity, suite fingerprint, dtype, device): a change in any of them
is a miss. Files live at `<cache_dir>/<slot>-<digest>.json`, where `slot` hashes only the
human-level names (model path, suite name, dtype, device) and `digest` the full key; storing a
new entry deletes the other digests of its slot, so stale baselines do not pile up.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from ..bench.deploy import DeploymentSpeed
from ..ruler.generate import GENERATOR_VERSION
from .result import EvalResult
from .timing import PREFILL_FORWARD_REPEATS

CACHE_FORMAT = 3  # bump when EvalResult or the harness changes what a cached number means


def default_cache_dir() -> Path:
    """`baselines/` under the model cache root: `$SKETCHWALK_CACHE`, else `$XDG_CACHE_HOME/sketchwalk`,
    else `~/.cache/sketchwalk` (see `sketchwalk.models.cache_dir`)."""
    from ..models import cache_dir

    return cache_dir() / "baselines"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def suite_fingerprint(suite, samples: Optional[dict] = None, *, essays_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The resolved content of a suite: tasks, lengths, samples, seed, the RULER generator's version
    (`sketchwalk.ruler.GENERATOR_VERSION`: a generator fix makes earlier baselines miss even where
    no samples are hashed), imports' sha256, essays' sha256, plus the sha256 of the built samples
    when given (which also catches tokenizer changes).

    suite: a `sketchwalk.ruler.Suite`; samples: {(task, length): [sample dicts]}.
    """
    fp: dict[str, Any] = {
        "name": suite.name, "tasks": list(suite.tasks), "lengths": list(suite.lengths),
        "samples": suite.samples, "seed": suite.seed, "generator": GENERATOR_VERSION,
        "imports": [{"task": i.task, "length": i.length, "sha256": file_sha256(i.path)} for i in suite.imports],
    }
    if suite.singularise_chat_template:
        fp["singularise_chat_template"] = True
    if essays_path is not None:
        fp["essays_sha256"] = file_sha256(essays_path)
    if samples is not None:
        fp["samples_sha256"] = _sha256(_canonical([[t, n, list(ss)] for (t, n), ss in sorted(samples.items())]))
    return fp


@dataclasses.dataclass(frozen=True)
class BaselineKey:
    """What a dense baseline depends on: model identity (`model_facts.model_identity`), suite
    fingerprint (`suite_fingerprint`), dtype ('float32', ...) and device ('cpu', GPU name)."""

    model: dict[str, Any]
    suite: dict[str, Any]
    dtype: str
    device: str
    batch_size: int = 1  # batched answers may differ from batch-1 answers by numerics: part of the key
    timing_samples: int = 2  # only meaningful with batch_size > 1
    speed: Optional[DeploymentSpeed] = None  # the deployment-length timing plan, if any (bench.deploy)

    def eval_options(self) -> dict[str, Any]:
        """The `evaluate` keyword arguments this key was computed with."""
        return {"batch_size": self.batch_size, "timing_samples": self.timing_samples, "speed": self.speed}

    def as_dict(self) -> dict[str, Any]:
        d = {"format": CACHE_FORMAT, "model": self.model, "suite": self.suite, "dtype": self.dtype, "device": self.device}
        if self.batch_size > 1:  # batch-1 keys stay what they were, so existing cache entries still hit
            d["run"] = {"batch_size": self.batch_size, "timing_samples": self.timing_samples}
        if self.speed is not None:  # likewise: keys without a speed plan are unchanged
            d["speed"] = self.speed.fingerprint()
        if self.device != "cpu":  # GPU results carry prefill_forward_s: older entries (without it) must miss
            d["prefill_forward_repeats"] = PREFILL_FORWARD_REPEATS
        return d

    def digest(self) -> str:
        """sha256 (first 16 hex digits) of the whole key."""
        return _sha256(_canonical(self.as_dict()))[:16]

    def slot(self) -> str:
        """Hash of the names only: entries of one slot replace each other."""
        files = [f[0] for f in self.model.get("files", [])]
        return _sha256(_canonical([files, self.suite.get("name"), self.dtype, self.device]))[:12]

    def path(self, cache_dir: str | os.PathLike) -> Path:
        return Path(cache_dir) / f"{self.slot()}-{self.digest()}.json"


def load_baseline(key: BaselineKey, cache_dir: str | os.PathLike | None = None) -> Optional[EvalResult]:
    """The cached dense result for `key`, or None (missing, unreadable, or a key mismatch)."""
    path = key.path(cache_dir or default_cache_dir())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # Compare the whole key, not just the file name: a digest collision or a hand-edited file must not hit.
    if data.get("key") != json.loads(_canonical(key.as_dict())):
        return None
    try:
        return EvalResult.from_dict(data["result"])
    except (KeyError, TypeError):
        return None


def store_baseline(key: BaselineKey, result: EvalResult, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write `result` for `key` atomically and drop the slot's entries for other keys; returns the path."""
    root = Path(cache_dir or default_cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    path = key.path(root)
    text = json.dumps({"key": json.loads(_canonical(key.as_dict())), "result": result.to_dict()}, indent=1, default=str)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in root.glob(f"{key.slot()}-*.json"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


def dense_baseline(model, tokenizer, samples: dict, key: BaselineKey, *, cache_dir: str | os.PathLike | None = None,
                   model_name: str = "", progress: bool = True,
                   evaluate_fn: Optional[Callable[..., EvalResult]] = None) -> EvalResult:
    """The dense EvalResult of `samples` for `key`: from the cache, else evaluated and stored.

    `evaluate_fn` defaults to
    `harness.evaluate` (a parameter so tests can count calls without a model).
    """
    cached = load_baseline(key, cache_dir)
    if cached is not None:
        return cached
    if evaluate_fn is None:
        from .harness import evaluate as evaluate_fn
    result = evaluate_fn(model, tokenizer, None, samples, model_name=model_name, progress=progress,
                         **key.eval_options())
    store_baseline(key, result, cache_dir)
    return result
