"""RULER (NVIDIA's synthetic long-context benchmark): task generators, length fitting, suites,
JSONL import and scoring. Facts and prompt strings: `../shared/docs/ruler.md`.

    samples = generate_task("niah_single_2", 8192, 20, tokenizer, essays_path="PaulGrahamEssays.json")
    suite = load_suite("ruler-11@4k,8k"); data = build_suite(suite, tokenizer, essays_path=...)
    score = metric_for_task("vt")(predictions, [s["outputs"] for s in samples])
"""
from .errors import RulerError
from .generate import GENERATOR_VERSION, generate_task
from .jsonl import read_jsonl, write_jsonl
from .scoring import metric_for_task, postprocess, score_task, string_match_all, string_match_part
from .suites import Suite, SuiteImport, build_suite, list_suites, load_suite, parse_length, short_samples_note
from .tasks import IMPORT_ONLY, TASKS, TaskSpec, get_task
from .templates import tokens_to_generate

__all__ = [
    "RulerError", "GENERATOR_VERSION", "generate_task", "read_jsonl", "write_jsonl", "metric_for_task", "postprocess",
    "score_task", "string_match_all", "string_match_part", "Suite", "SuiteImport", "build_suite",
    "list_suites", "load_suite", "parse_length", "IMPORT_ONLY", "TASKS", "TaskSpec", "get_task",
    "tokens_to_generate", "short_samples_note",
]
