"""Where does TTFT noise come from? Same prompt, repeated: generate()+streamer TTFT (our harness's
method) vs a bare prefill forward (sync + perf_counter) vs CUDA events, dense and trial-12 config."""
import json, os, statistics as st, time, torch
from sketchwalk import models, SketchWalkConfig, attach, detach
from sketchwalk.ruler import generate_task
from sketchwalk.evaluation.timing import TokenClock
from sketchwalk.evaluation.harness import prefer_flash_sdpa
m, tok = models.load("smollm2-135m", progress=False)
out = {}
cfg12 = SketchWalkConfig(block_size=64, sketch_dim=64, density=0.46451529210271925, sparsity_exponent=6.232766784916079, skip_layers=1)
for L in (4096, 8192):
    s = generate_task("niah_single_1", L, 1, tok, seed=1, max_context=8192)[0]
    ids = tok(s["input"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    for name, cfg in (("dense", None), ("trial12", cfg12)):
        if cfg is not None: attach(m, cfg)
        else: detach(m)
        r = {"ttft_generate": [], "forward_wall": [], "forward_events": []}
        with prefer_flash_sdpa(ids.device), torch.no_grad():
            for rep in range(3):
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
            for rep in range(12):
                c = TokenClock(ids.device); c.start()
                m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id, streamer=c)
                r["ttft_generate"].append(c.prefill_s * 1e3)
            for rep in range(12):
                torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize()
                r["forward_wall"].append((time.perf_counter() - t) * 1e3)
            for rep in range(12):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); m(ids, use_cache=True); b.record(); torch.cuda.synchronize()
                r["forward_events"].append(a.elapsed_time(b))
        detach(m)
        for k, v in r.items():
            print(f"L={L} {name:8s} {k:15s} ms: median {st.median(v):7.2f} min {min(v):7.2f} max {max(v):7.2f} "
                  f"cv {st.pstdev(v)/st.mean(v):.2f}", flush=True)
        out[f"{L}-{name}"] = r
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "ttft_noise.json"), "w"), indent=1)
