"""The selector study (`tensors study`), answer annotations of recordings, and the GPU summary
(`ablations.selector_summary`): values checked against hand-computed ones."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ablations.selector_summary import main as summary_main
from ablations.selector_summary import sample_scores, summarize
from ablations.tensors_cli import load_study_plan
from sketchwalk import SketchWalkConfig
from sketchwalk.cli import main as cli_main
from sketchwalk.validation import answer_annotation, collect
from sketchwalk.validation.study import block_coherence, study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512)


class WordTokenizer:
    """A tokenizer whose tokens are the space-separated words (with their leading space)."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        offsets, start = [], 0
        for i, ch in enumerate(text + " "):
            if ch == " " and i > start:
                offsets.append((start, i))
                start = i
        return {"input_ids": list(range(len(offsets))), "offset_mapping": offsets}


def test_answer_annotation_finds_needles_before_the_appended_answer():
    text = "a b 1234 c d e 1234 f Answer: 1234"
    start = text.index(" 1234", text.index("Answer"))
    note = answer_annotation(WordTokenizer(), text, ["1234"], start)
    # words: a b 1234 c d e 1234 f Answer: 1234 -> the haystack copies are tokens 2 and 6, the answer 9
    assert note == {"needles": [[2, 3], [6, 7]], "answer_tokens": [9, 10]}
    assert answer_annotation(WordTokenizer(), "x y", ["z"])["needles"] == []


def test_block_coherence_is_zero_for_equal_keys_and_large_for_scattered_ones():
    k = torch.ones(2, 32, 4)
    assert block_coherence(k, 16) == 0.0
    k2 = torch.ones(1, 32, 4)
    k2[:, ::2] = -0.9  # block mean 0.05 per channel, keys ~±1 apart from it
    assert block_coherence(k2, 16) > 100


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa")).eval()
    g = torch.Generator().manual_seed(1)
    out = tmp_path_factory.mktemp("rec")
    ids = [torch.randint(1, 128, (n,), generator=g) for n in (250, 200)]
    notes = [{"needles": [[20, 24]], "answer_tokens": [240, 250]}, {"needles": [[40, 41]], "answer_tokens": [194, 200]}]
    collect(model, None, ids, out, progress=False, model_name="tiny", annotations=notes)
    return out


def _variants():
    base = dict(block_size=16, sketch_dim=8, skip_layers=1)
    return {"paper": SketchWalkConfig(**base), "sub4": SketchWalkConfig(**base, score_block_size=4),
            "oracle": SketchWalkConfig(**base, selector="oracle")}


def test_study_rows_match_their_definitions(record_dir):
    res = study([record_dir], _variants(), [0.2, 0.5])
    rows = {(r["variant"], r["target_density"]): r for r in res.rows}
    assert len(rows) == 6
    assert min(rows[("paper", d)]["jaccard"] for d in (0.2, 0.5)) < 1.0
    for d in (0.2, 0.5):
        o, p = rows[("oracle", d)], rows[("paper", d)]
        assert o["jaccard"] == 1.0
        # Same counts per row for every selector: equal measured densities; the oracle's recall is the bound.
        assert p["density_prefill"] == o["density_prefill"] == rows[("sub4", d)]["density_prefill"]
        assert o["recall_prefill"] >= p["recall_prefill"] - 1e-9 and o["recall_decode"] >= p["recall_decode"] - 1e-9
        for r in (o, p):
            assert 0 < r["recall_decode"] <= 1 + 1e-9 and 0 <= r["needle_recall"] <= 1 + 1e-9
    assert rows[("paper", 0.5)]["density_prefill"] > rows[("paper", 0.2)]["density_prefill"]
    assert rows[("paper", 0.5)]["recall_prefill"] > rows[("paper", 0.2)]["recall_prefill"]
    coh = res.coherence[str(record_dir)]
    assert sorted(coh) == [0, 1, 2, 3] and all(v > 0 and math.isfinite(v) for v in coh.values())
    assert res.to_dict()["variants"]["paper"]["target_density"] == 0.2


def test_study_cli_writes_table_json_plot_and_refuses_bad_plans(record_dir, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"recordings: [{record_dir}]\ndensities: [0.3]\nbase: {{block_size: 16, sketch_dim: 8}}\n"
                    f"variants: {{paper: {{}}, oracle: {{selector: oracle}}}}\nout: {tmp_path / 'out'}\n")
    assert cli_main(["tensors", "study", str(plan)]) == 0
    data = json.loads((tmp_path / "out" / "study.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"paper", "oracle"}
    assert (tmp_path / "out" / "recall_density.png").stat().st_size > 1000
    assert "| paper | 0.30 |" in (tmp_path / "out" / "study.md").read_text()
    # A relative `out` means beside the plan, whatever the working directory (like `recordings`).
    sub = tmp_path / "plans"
    sub.mkdir()
    (sub / "rel.yaml").write_text(plan.read_text().replace(f"out: {tmp_path / 'out'}", "out: ../rel-out"))
    assert load_study_plan(str(sub / "rel.yaml"))["out"] == str(sub / "../rel-out")
    with pytest.raises(ValueError, match="out"):
        (sub / "num.yaml").write_text(plan.read_text().replace(f"out: {tmp_path / 'out'}", "out: 3"))
        load_study_plan(str(sub / "num.yaml"))
    bad = tmp_path / "bad.yaml"
    for text, needle in ((f"recordings: [{record_dir}]\nvariants: {{a: {{}}}}\ncolour: red\n", "colour"),
                         (f"recordings: [{record_dir}]\nvariants: {{a: {{walk: sideways}}}}\n", "walk"),
                         (f"recordings: [{record_dir}]\ndensities: [1.5]\nvariants: {{a: {{}}}}\n", "densities"),
                         (f"recordings: [{tmp_path}]\nvariants: {{a: {{}}}}\n", "recordings")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=needle):
            load_study_plan(str(bad))
        assert cli_main(["tensors", "study", str(bad)]) == 2


def _eval(scores: dict[tuple[str, int], list[float]], density=0.2):
    return {"config": {"density": density}, "density": {"sparse_layers": {"prefill": density}},
            "samples": [{"task": t, "length": n, "score": s} for (t, n), ss in scores.items() for s in ss]}


def test_summary_scores_and_paired_intervals():
    dense = _eval({("a", 4096): [1, 1, 0, 1], ("b", 4096): [1, 0, 0, 0]}, 1.0)
    same = _eval({("a", 4096): [1, 1, 0, 1], ("b", 4096): [1, 0, 0, 0]})
    worse = _eval({("a", 4096): [0, 0, 0, 0], ("b", 4096): [0, 0, 0, 0]})
    s = summarize(dense, {"same": same, "worse": worse}, best="same")
    assert s["dense"] == {"4096": 50.0}  # (75 + 25) / 2
    same_row, worse_row = s["variants"]
    assert same_row["4096"] == 50.0 and same_row["diff_lo"] == {"4096": 0.0} and same_row["diff_hi"] == {"4096": 0.0}
    assert worse_row["4096"] == 0.0 and worse_row["diff_hi"]["4096"] < 0 and s["best"] == "same"
    assert sample_scores(dense)[("a", 4096, 2)] == 0.0
    with pytest.raises(ValueError, match="lacks"):
        summarize(dense, {"short": _eval({("a", 4096): [1]})})


def test_summary_cli_bad_input_exits_2(tmp_path, capsys):
    assert summary_main(["--dense", str(tmp_path / "none.json"), "--variant", "x=y", "--out", str(tmp_path)]) == 2
    assert summary_main(["--dense", str(tmp_path / "none.json"), "--variant", "novalue", "--out", str(tmp_path)]) == 2
    assert "--variant" in capsys.readouterr().err


def test_summary_compares_two_variants_pairwise(tmp_path):
    """--compare A-B: the paired difference A - B per length, the same bootstrap as against dense;
    a name that is not a variant is refused (exit 2, naming the flag)."""
    dense = _eval({("a", 4096): [1, 1, 1, 1]}, 1.0)
    good = _eval({("a", 4096): [1, 1, 1, 0]})
    bad = _eval({("a", 4096): [0, 0, 1, 0]})
    s = summarize(dense, {"good": good, "bad": bad}, compare=[("good", "bad"), ("bad", "bad")])
    gb, bb = s["comparisons"]
    assert (gb["a"], gb["b"]) == ("good", "bad") and gb["4096"]["diff"] == 50.0  # (3 - 1) / 4
    assert 0 <= gb["4096"]["lo"] < 50.0 < gb["4096"]["hi"] <= 100.0  # differences [1, 1, 0, 0]
    assert bb["4096"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError, match="not a variant"):
        summarize(dense, {"good": good}, compare=[("good", "nope")])
    paths = {}
    for name, res in (("dense", dense), ("good", good), ("bad", bad)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(res))
    args = ["--dense", str(paths["dense"]), "--variant", f"good={paths['good']}", "--variant", f"bad={paths['bad']}",
            "--out", str(tmp_path / "out")]
    assert summary_main(args + ["--compare", "good-bad"]) == 0
    assert "good − bad | +50.0" in (tmp_path / "out" / "summary.md").read_text()
    assert summary_main(args + ["--compare", "good"]) == 2


def test_summary_takes_recalls_from_a_named_tensor_variant(tmp_path, capsys):
    """--tensor-variant NAME=T: a GPU variant (here with an option the replay does not see) gets the
    tensor study's variant T's recalls; a T the study lacks is refused naming the flag."""
    dense = _eval({("a", 4096): [1, 1, 1, 1]}, 1.0)
    good = _eval({("a", 4096): [1, 1, 1, 0]})
    tensors = {"variants": {"t1": {"recall_prefill": 0.81, "recall_decode": 0.92}}}
    s = summarize(dense, {"good_dl1": good}, tensors=tensors, tensor_names={"good_dl1": "t1"})
    assert (s["variants"][0]["recall_prefill"], s["variants"][0]["recall_decode"]) == (0.81, 0.92)
    assert summarize(dense, {"good_dl1": good}, tensors=tensors)["variants"][0]["recall_prefill"] is None
    with pytest.raises(ValueError, match="--tensor-variant"):
        summarize(dense, {"good_dl1": good}, tensors=tensors, tensor_names={"good_dl1": "t2"})
    paths = {}
    for name, res in (("dense", dense), ("good", good), ("tensors", tensors)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(res))
    args = ["--dense", str(paths["dense"]), "--variant", f"g={paths['good']}", "--tensors", str(paths["tensors"]),
            "--out", str(tmp_path / "out")]
    assert summary_main(args + ["--tensor-variant", "g=t1"]) == 0
    assert "| 0.810 | 0.920 |" in (tmp_path / "out" / "summary.md").read_text()
    assert summary_main(args + ["--tensor-variant", "g"]) == 2
    assert "--tensor-variant" in capsys.readouterr().err


def _suite_eval(scores, seed, density=0.2, config=None):
    res = _eval(scores, density)
    res["suite"] = {"name": f"s{seed}", "seed": seed, "samples": 4}
    if config is not None:
        res["config"] = config
    return res


def test_summary_pools_replicate_seeds(tmp_path):
    """Replicates (one eval per suite seed, dense and variant in the same order): scores and paired
    intervals over all samples, paired replicate by replicate; mismatched suites or configs are refused."""
    d1 = _suite_eval({("a", 4096): [1, 1, 1, 1]}, 44, 1.0)
    d2 = _suite_eval({("a", 4096): [1, 1, 0, 0]}, 45, 1.0)
    v1 = _suite_eval({("a", 4096): [1, 1, 1, 0]}, 44, 0.2)
    v2 = _suite_eval({("a", 4096): [1, 1, 0, 0]}, 45, 0.3, {"density": 0.2})  # same config, other measured density
    s = summarize([d1, d2], {"v": [v1, v2]})
    assert s["dense"] == {"4096": 75.0}  # 6 of 8
    row = s["variants"][0]
    assert row["4096"] == 62.5 and abs(row["density"] - 0.25) < 1e-12  # 5 of 8; mean density
    assert row["diff_lo"]["4096"] < 0 <= row["diff_hi"]["4096"]  # differences [0, 0, 0, -1, 0, 0, 0, 0]
    assert [r["seed"] for r in s["replicates"]] == [44, 45]
    with pytest.raises(ValueError, match="differ from dense"):
        summarize([d1, d2], {"v": [v2, v1]})
    with pytest.raises(ValueError, match="different configs"):
        summarize([d1, d2], {"v": [v1, _suite_eval({("a", 4096): [1, 1, 0, 0]}, 45, 0.3, {"density": 0.3})]})
    paths = {}
    for name, res in (("d1", d1), ("d2", d2), ("v1", v1), ("v2", v2)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(res))
    assert summary_main(["--dense", str(paths["d1"]), "--dense", str(paths["d2"]), "--variant", f"v={paths['v1']}",
                         "--variant", f"v={paths['v2']}", "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Pooled over s44 (seed 44), s45 (seed 45)" in md and "| v | 0.250 | 62.5 (-12.5" in md


def test_head_limit_orders_granularities_and_matches_the_study(record_dir, tmp_path):
    """ablations.head_limit: per-head selections can only keep more of each head's own mass (head >= kv
    >= shared, for the oracle by construction), at one measured density; its shared oracle is the
    study's oracle (same recall); density 1 keeps everything; the CLI writes its table."""
    from ablations.head_limit import main as limit_main
    from ablations.head_limit import measure

    base = SketchWalkConfig(block_size=16, sketch_dim=8, skip_layers=1, dense_last_blocks=1)
    rows = {(r["selector"], r["granularity"], r["density"]): r for r in measure([record_dir], [0.3, 1.0], base=base)}
    for metric in ("recall_prefill", "recall_decode"):
        o = [rows[("oracle", g, 0.3)][metric] for g in ("shared", "kv", "head")]
        assert o[0] <= o[1] + 1e-9 <= o[2] + 2e-9, (metric, o)
        assert o[2] < 1
    assert len({round(r["density_prefill"], 9) for k, r in rows.items() if k[2] == 0.3}) == 1
    assert all(abs(r["recall_prefill"] - 1) < 1e-5 and abs(r["recall_decode"] - 1) < 1e-5
               for k, r in rows.items() if k[2] == 1.0)
    ref = study([record_dir], {"oracle": base.replace(selector="oracle")}, [0.3]).rows[0]
    assert math.isclose(rows[("oracle", "shared", 0.3)]["recall_prefill"], ref["recall_prefill"], rel_tol=1e-5)
    assert limit_main([str(record_dir), "--density", "0.3", "--out", str(tmp_path)]) == 0
    assert "| oracle | kv | 0.30 |" in (tmp_path / "head_limit.md").read_text()
    assert limit_main([str(tmp_path), "--out", str(tmp_path)]) == 2
