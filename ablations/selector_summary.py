"""A selector study's GPU summary from `sketchwalk eval` result JSONs: per length, each variant's
RULER score and its paired-bootstrap 95% interval against dense on the same samples.

    python -m ablations.selector_summary --dense dense.json --variant paper=paper.json \
        --variant sub8=sub8.json --tensors study.json --best sub8 --out results/selector-study

writes `summary.json` (the shape issue 16 names) and `summary.md`. Every eval JSON must hold the
same samples (same suite, seed and sample count): the pairs are matched by (task, length, position
of the sample within its task and length), and a variant missing any of dense's samples is refused.
Replicates pool: `--dense` and a variant's `--variant NAME=PATH` may each be given once per suite
seed, in the same order (e.g. seeds 44 and 45): scores, intervals and differences are then over all
their samples, paired replicate by replicate (a variant's replicates must match dense's suites and
share one config).
`--tensors` adds the tensor-level recalls (`sketchwalk tensors study`'s JSON, at density 0.2).
`--best` names the variant chosen before these samples were scored (chosen on them, it would be
tuned on what it reports).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .report import paired_bootstrap

SampleKey = tuple[str, int, int]


def sample_scores(result: Union[dict[str, Any], Sequence[dict[str, Any]]]) -> dict[SampleKey, float]:
    """{(task, length, position within task x length): score in [0, 1]} of one eval result JSON, or of
    replicates (a list: the positions of each continue after the previous ones')."""
    seen: dict[tuple[str, int], int] = collections.Counter()
    out = {}
    for res in ([result] if isinstance(result, dict) else result):
        for s in res["samples"]:
            key = (s["task"], int(s["length"]))
            out[(*key, seen[key])] = float(s["score"])
            seen[key] += 1
    return out


def _replicates(result: Union[dict[str, Any], Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [result] if isinstance(result, dict) else list(result)


def _suite_id(result: dict[str, Any]) -> tuple:
    suite = result.get("suite") or {}
    return (suite.get("name"), suite.get("seed"), suite.get("samples"))


def ruler_score(scores: dict[SampleKey, float], length: int) -> float:
    """RULER average at one length: the mean over tasks of each task's mean score, x100."""
    tasks = collections.defaultdict(list)
    for (task, n, _), v in scores.items():
        if n == length:
            tasks[task].append(v)
    return 100 * sum(sum(v) / len(v) for v in tasks.values()) / len(tasks)


def summarize(dense: Union[dict[str, Any], Sequence[dict[str, Any]]],
              variants: dict[str, Union[dict[str, Any], Sequence[dict[str, Any]]]], *,
              tensors: Optional[dict[str, Any]] = None, best: Optional[str] = None,
              compare: Optional[list[tuple[str, str]]] = None, seed: int = 0,
              tensor_names: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The summary dict: dense per length, per variant config / measured density (sparse layers,
    prefill) / score per length / paired interval of variant - dense per length / tensor recalls
    (the tensor study's variant of the same name, or `tensor_names[name]`: the GPU variant may add
    options the replay does not see, e.g. dense_last_blocks); `comparisons`: for each (a, b) in
    `compare`, the paired difference a - b per length. dense and each variant: one eval result, or a
    list of replicates (see the module doc); `replicates` in the summary lists dense's suites."""
    base = sample_scores(dense)
    lengths = sorted({n for _, n, _ in base})
    out: dict[str, Any] = {"dense": {str(n): round(ruler_score(base, n), 3) for n in lengths}, "variants": []}
    by_name = {name: sample_scores(res) for name, res in variants.items()}
    suites = [_suite_id(r) for r in _replicates(dense)]
    if len(suites) > 1:
        out["replicates"] = [{"suite": n, "seed": sd, "samples": k} for n, sd, k in suites]
    for name, res in variants.items():
        reps = _replicates(res)
        if [_suite_id(r) for r in reps] != suites:
            raise ValueError(f"variant {name!r}: its replicates' suites {[_suite_id(r) for r in reps]} differ from "
                             f"dense's {suites} (give them in the same order)")
        if len({json.dumps(r.get("config"), sort_keys=True) for r in reps}) != 1:
            raise ValueError(f"variant {name!r}: its replicates were evaluated with different configs")
        scores = by_name[name]
        missing = sorted(set(base) - set(scores))
        if missing:
            raise ValueError(f"variant {name!r} lacks {len(missing)} of dense's samples (first: {missing[0]}): "
                             f"evaluate it on the same suite, seed and samples")
        dens = [r["density"].get("sparse_layers", {}).get("prefill") for r in reps]
        row: dict[str, Any] = {"name": name, "config": reps[0].get("config"),
                               "density": None if None in dens else sum(dens) / len(dens)}
        lo, hi = {}, {}
        for n in lengths:
            keys = sorted(k for k in base if k[1] == n)
            row[str(n)] = round(ruler_score(scores, n), 3)
            _, lo[str(n)], hi[str(n)] = paired_bootstrap([base[k] for k in keys], [scores[k] for k in keys], seed=seed)
        row["diff_lo"], row["diff_hi"] = ({k: round(v, 3) for k, v in d.items()} for d in (lo, hi))
        tensor_name = (tensor_names or {}).get(name, name)
        recall = (tensors or {}).get("variants", {}).get(tensor_name, {})
        if tensors is not None and tensor_names and name in tensor_names and not recall:
            raise ValueError(f"--tensor-variant {name}={tensor_name}: the tensor study has no variant "
                             f"{tensor_name!r} (it has {sorted(tensors.get('variants', {}))})")
        row["recall_prefill"], row["recall_decode"] = recall.get("recall_prefill"), recall.get("recall_decode")
        out["variants"].append(row)
    if best is not None and best not in variants:
        raise ValueError(f"--best {best!r} is not a variant: {sorted(variants)}")
    out["best"] = best
    out["comparisons"] = [_compare(a, b, by_name, lengths, seed)
                          for a, b in (compare or [])]
    return out


def _compare(a: str, b: str, scores: dict[str, dict[SampleKey, float]], lengths: list[int], seed: int) -> dict[str, Any]:
    """Paired difference a - b per length (RULER points, x100) with its bootstrap 95% interval,
    over the samples both variants answered (the same suite, seed and samples as dense)."""
    for name in (a, b):
        if name not in scores:
            raise ValueError(f"--compare {a}-{b}: {name!r} is not a variant: {sorted(scores)}")
    row: dict[str, Any] = {"a": a, "b": b}
    for n in lengths:
        keys = sorted(k for k in scores[b] if k[1] == n)
        diff, lo, hi = paired_bootstrap([scores[b][k] for k in keys], [scores[a][k] for k in keys], seed=seed)
        row[str(n)] = {"diff": round(diff, 3), "lo": round(lo, 3), "hi": round(hi, 3)}
    return row


def markdown(summary: dict[str, Any]) -> str:
    """A markdown table of the summary: score and paired 95% interval of the difference per length."""
    lengths = list(summary["dense"])
    head = ["variant", "density"] + [f"{n} (diff [95%])" for n in lengths] + ["recall prefill", "recall decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if summary.get("replicates"):
        lines.insert(0, "Pooled over " + ", ".join(f"{r['suite']} (seed {r['seed']})" for r in summary["replicates"])
                     + ": every score and interval covers all their samples.\n")
    lines.append("| dense | 1.000 | " + " | ".join(f"{summary['dense'][n]:.1f}" for n in lengths) + " | | |")
    for r in summary["variants"]:
        cells = [r["name"] + (" (best)" if r["name"] == summary.get("best") else ""), _num(r["density"])]
        for n in lengths:
            diff = r[n] - summary["dense"][n]
            cells.append(f"{r[n]:.1f} ({diff:+.1f} [{r['diff_lo'][n]:+.1f}, {r['diff_hi'][n]:+.1f}])")
        cells += [_num(r["recall_prefill"]), _num(r["recall_decode"])]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("comparisons"):
        lines += ["", "| paired difference | " + " | ".join(f"{n} [95%]" for n in lengths) + " |",
                  "|" + "---|" * (len(lengths) + 1)]
        for c in summary["comparisons"]:
            cells = [f"{c['a']} − {c['b']}"] + [f"{c[n]['diff']:+.1f} [{c[n]['lo']:+.1f}, {c[n]['hi']:+.1f}]"
                                                for n in lengths]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "" if v is None else f"{v:.3f}"


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: exit 0, or 2 on bad input (a message naming the argument)."""
    p = argparse.ArgumentParser(prog="python -m ablations.selector_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", action="append", required=True,
                   help="the dense eval JSON (repeat once per replicate suite seed)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="a variant's eval JSON (repeat a NAME once per replicate, in --dense's order)")
    p.add_argument("--tensors", default=None, help="`sketchwalk tensors study` JSON (tensor-level recalls)")
    p.add_argument("--tensor-variant", action="append", default=[], metavar="NAME=TENSOR_NAME",
                   help="take variant NAME's recalls from the tensor study's variant TENSOR_NAME (repeatable)")
    p.add_argument("--best", default=None, help="the variant chosen before these samples were scored")
    p.add_argument("--compare", action="append", default=[], metavar="A-B",
                   help="also the paired difference of variant A minus variant B per length (repeatable)")
    p.add_argument("--out", required=True, help="directory for summary.json and summary.md")
    args = p.parse_args(argv)
    try:
        pairs = [v.split("=", 1) for v in args.variant]
        if not pairs or any(len(pv) != 2 or not pv[0] for pv in pairs):
            raise ValueError("--variant: give at least one, each as NAME=PATH")
        compare = [tuple(c.split("-", 1)) for c in args.compare]
        if any(len(c) != 2 or not all(c) for c in compare):
            raise ValueError("--compare: give each as A-B, two variant names")
        tensor_names = dict(t.split("=", 1) for t in args.tensor_variant if "=" in t)
        if len(tensor_names) != len(args.tensor_variant) or not all(tensor_names) or not all(tensor_names.values()):
            raise ValueError("--tensor-variant: give each as NAME=TENSOR_NAME")
        load = lambda path: json.loads(Path(path).read_text())  # noqa: E731
        runs: dict[str, list] = {}
        for name, path in pairs:
            runs.setdefault(name, []).append(load(path))
        one = lambda xs: xs[0] if len(xs) == 1 else xs  # noqa: E731
        summary = summarize(one([load(path) for path in args.dense]), {name: one(rs) for name, rs in runs.items()},
                            tensors=load(args.tensors) if args.tensors else None, best=args.best, compare=compare,
                            tensor_names=tensor_names)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
