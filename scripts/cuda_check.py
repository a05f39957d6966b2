"""The first thing to run on a lent GPU machine: do the CUDA paths compute what the CPU computes?

Run from the repository root, on the device machine (whose python3 holds a CUDA PyTorch; see
scripts/cuda_check.sh for the whole command), or here with ``--device cpu`` to check the script itself:

    python3 scripts/cuda_check.py --out $OUT            # CUDA; every check's result in $OUT/cuda_check.json

Checks, each on small random-weight models written into a scratch store (no download):

1. *fidelity*: per family (mixtral, qwen3_moe, deepseek_v3, gpt_oss) and compute dtype, the CUDA engine's
   logits of a 24-token prompt against the CPU engine's float32 logits on the same weights (bound: float32
   1e-3 of the logits' scale; bf16 twice the CPU engine's own bf16-vs-float32 difference); greedy
   continuation (16 tokens) identical where the CPU run's top-2 margin exceeds twice the difference.
2. *memory*: the offloaded run (expert budget 25%: CUDA slots, pinned staging, the copy stream and
   its events) against the all-resident run on CUDA: the same logits bit for bit and the same greedy
   tokens, on bf16 and q4_k experts (a model pulled with ``--quantize q4_k``); and the cache's bytes
   as stored.
3. *bench*: ``moeinf bench`` on the 32-layer Mixtral-shaped model (x0.25) all resident and at 25%
   with replayed routing, 16 tokens: tokens/s and the loader's bytes, for the README.

Exit status 0 only if every check passed; the JSON says which failed and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = {  # family -> (experts, top-k, hidden, intermediate, layers)
    "mixtral": (8, 2, 256, 512, 4),
    "qwen3_moe": (16, 4, 256, 128, 4),
    "deepseek_v3": (16, 4, 256, 128, 4),
    "gpt_oss": (8, 2, 256, 256, 4),
}
PROMPT = list(range(3, 27))


def _greedy(session, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(session.logits(out)[-1].argmax()))
    return out[len(ids):]


def check_fidelity(device: str, results: dict) -> None:
    import torch

    import engine
    from engine.bench.synthetic import make_synthetic_model

    for fam, (e, k, h, i, layers) in FAMILIES.items():
        name = f"cc-{fam}"
        try:
            root = make_synthetic_model(name, fam, layers, e, k, h, i, 512, torch.bfloat16, seed=1)
        except Exception as err:  # a family the synthetic writer does not take is reported, not fatal
            results[f"fidelity/{fam}"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            continue
        with engine.load(root, device="cpu", dtype="bfloat16", ctx=128, expert_budget="100%") as cpu_bf16:
            cpu_bf16_logits = cpu_bf16.logits(PROMPT)
        with engine.load(root, device="cpu", dtype="float32", ctx=128, expert_budget="100%") as ref:
            want = ref.logits(PROMPT)
            want_tokens = _greedy(ref, PROMPT, 16)
            margins = []
            seq = list(PROMPT)
            for t in want_tokens:
                top2 = ref.logits(seq)[-1].topk(2).values
                margins.append(float(top2[0] - top2[1]))
                seq.append(t)
        for dtype in ("bfloat16", "float32"):
            key = f"fidelity/{fam}/{dtype}"
            try:
                with engine.load(root, device=device, dtype=dtype, ctx=128, expert_budget="100%") as s:
                    got = s.logits(PROMPT)
                    tokens = _greedy(s, PROMPT, 16)
                diff = float((got - want).abs().max())
                scale = float(want.abs().max())
                # bf16: within twice what bf16 rounding costs the CPU engine on these weights; float32: 1e-3
                cpu_bf16_diff = float((cpu_bf16_logits - want).abs().max())
                bound = max(2 * cpu_bf16_diff if dtype == "bfloat16" else 0.0, 1e-3 * max(1.0, scale))
                agree = all(a == b or m <= 2 * diff for a, b, m in zip(tokens, want_tokens, margins, strict=True))
                first = next((j for j, (a, b) in enumerate(zip(tokens, want_tokens, strict=True)) if a != b), None)
                results[key] = {"ok": diff <= bound and agree, "max_abs_diff": diff, "bound": bound,
                                "logit_scale": scale, "tokens_agree_where_margin_allows": agree,
                                "first_token_difference": first}
            except Exception as err:
                results[key] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                "traceback": traceback.format_exc(limit=4)}


def check_memory(device: str, results: dict) -> None:
    import torch

    import engine
    from engine.bench.synthetic import make_synthetic_model
    from engine.store.export import export_model
    from engine.store.pull import pull_model

    base = make_synthetic_model("cc-offload", "mixtral", 6, 8, 2, 256, 512, 512, torch.bfloat16, seed=2)
    stores = {"bf16": base}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = export_model("cc-offload", Path(tmp) / "ckpt")
            stores["q4_k"] = pull_model(str(ckpt), name="cc-offload-q4_k", quantize="q4_k").path
    except Exception as err:
        results["memory/q4_k/pull"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    for fmt, root in stores.items():
        key = f"memory/{fmt}"
        try:
            with engine.load(root, device=device, ctx=128, expert_budget="100%") as full:
                want = full.logits(PROMPT)
                want_tokens = _greedy(full, PROMPT, 16)
            with engine.load(root, device=device, ctx=128, expert_budget="25%") as off:
                got = off.logits(PROMPT)
                tokens = _greedy(off, PROMPT, 16)
                info = off.info()
            results[key] = {"ok": torch.equal(got, want) and tokens == want_tokens,
                            "max_abs_diff": float((got - want).abs().max()), "tokens_equal": tokens == want_tokens,
                            "info": {k: v for k, v in info.items() if isinstance(v, int | float | str | bool)}}
        except Exception as err:
            results[key] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc(limit=4)}


def check_bench(device: str, results: dict, tokens: int) -> None:
    from engine.bench.run import bench_main

    trace = ROOT.parent / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval0.npz"
    if not trace.exists():
        trace = ROOT / "shared" / "traces" / "mixtral-8x7b-instruct-humaneval0.npz"
    try:
        t0 = time.perf_counter()
        res = bench_main(model=None, synthetic="mixtral-8x7b", scale=0.25, prompt_tokens=1, gen_tokens=tokens,
                         repetitions=1, budgets=["100%", "25%"], policies=["eam"],
                         replay=str(trace) if trace.exists() else None, profile=False, dtype=None, device=device)
        rows = [{k: r.get(k) for k in ("budget", "decode_tps", "ms_per_token", "hit_rate", "bytes_per_token",
                                       "stall_share", "load_s")} for r in res["rows"]]
        results["bench"] = {"ok": True, "rows": rows, "seconds": time.perf_counter() - t0,
                            "replay": trace.exists()}
    except Exception as err:
        results["bench"] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc(limit=6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", default="fidelity,memory,bench")
    ap.add_argument("--bench-tokens", type=int, default=16)
    a = ap.parse_args()
    os.environ.setdefault("MOEINF_HOME", tempfile.mkdtemp(prefix="moeinf-cuda-check-"))
    import torch

    results: dict = {"device": a.device, "torch": torch.__version__,
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    steps = {"fidelity": lambda: check_fidelity(a.device, results),
             "memory": lambda: check_memory(a.device, results),
             "bench": lambda: check_bench(a.device, results, a.bench_tokens)}
    for step in a.only.split(","):
        t0 = time.perf_counter()
        steps[step]()
        print(f"{step}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "cuda_check.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok")]
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"{'ok  ' if v.get('ok') else 'FAIL'} {k}: " + json.dumps({x: y for x, y in v.items()
                                                                            if x != "traceback"}, default=str)[:300])
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
