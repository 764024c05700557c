"""End to end: a model with Sketch&Walk on backend=torch (the reference) vs backend=triton.

For each needle prompt: greedy tokens of both backends (identical?), the largest logit difference
over the generated steps, and the prefill time (synchronised forward over the prompt, median of 3)
for dense SDPA, the reference and the Triton path. Needs CUDA.

    python benchmarks/e2e_backends.py --model model.gguf --essays PaulGrahamEssays.json --out e2e.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sketchwalk import SketchWalkConfig, attach, detach
from sketchwalk.models import load
from sketchwalk.ruler import generate_task


def _prefill_s(model, ids, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _generate(model, ids, n_new: int):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--essays", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--samples", type=int, default=5, help="per task per length")
    p.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_single_2"])
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--out", default="e2e_backends.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    model, tok = load(args.model, progress=False)
    cfg = SketchWalkConfig(density=args.density)
    rows = []
    for length in args.lengths:
        for task in args.tasks:
            for s in generate_task(task, length, args.samples, tok, essays_path=args.essays, max_context=8192):
                ids = tok(s["input"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids.cuda()
                detach(model)
                _prefill_s(model, ids, 1)
                row = {"task": task, "length": length, "tokens": ids.shape[1], "dense_prefill_s": _prefill_s(model, ids)}
                gens = {}
                for backend in ("torch", "triton"):
                    attach(model, cfg, backend=backend)
                    _prefill_s(model, ids, 1)  # warm-up (Triton compiles on first use)
                    row[f"{backend}_prefill_s"] = _prefill_s(model, ids)
                    gens[backend] = _generate(model, ids, args.new_tokens)
                    detach(model)
                a, b = gens["torch"], gens["triton"]
                row["same_tokens"] = bool(torch.equal(a.sequences, b.sequences))
                steps = min(len(a.logits), len(b.logits))
                row["max_logit_diff"] = max(float((a.logits[i] - b.logits[i]).abs().max()) for i in range(steps))
                row["torch_answer"] = tok.decode(a.sequences[0, ids.shape[1]:], skip_special_tokens=True)
                row["triton_answer"] = tok.decode(b.sequences[0, ids.shape[1]:], skip_special_tokens=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for length in args.lengths:
        rs = [r for r in rows if r["length"] == length]
        summary[length] = {
            "samples": len(rs), "same_tokens": sum(r["same_tokens"] for r in rs),
            "max_logit_diff": max(r["max_logit_diff"] for r in rs),
            **{f"median_{k}": statistics.median(r[k] for r in rs) for k in ("dense_prefill_s", "torch_prefill_s", "triton_prefill_s")},
        }
    print(json.dumps(summary, indent=1))
    with open(args.out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": cfg.to_dict(),
                   "summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
