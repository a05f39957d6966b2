"""Decode speed of a Mixtral-shaped model whose experts do not fit the budget, per policy, next to the
all-resident run.

A synthetic model (random bf16 weights; 32 layers x 8 experts, top-2, hidden 1024, expert
intermediate 2816: 256 experts of 17.3 MB = 4.4 GB) is written into the store once, then for each
configuration (all resident; a 25% budget with each policy) the script generates greedily with
``CausalLM.forward``: one warm-up generation, then ``--runs`` measured ones; it reports the median
decode tokens/s, the prompt-eval tokens/s and the cache counters, and checks every configuration
produced the same tokens. Expert loads are O_DIRECT reads, so the page cache does not hide the disk.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/offload_mixtral.py

Options: --budget 25% --policies lru,lfu,eam --prompt 16 --tokens 16 --runs 3 --dtype fp32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.bench.synthetic import make_synthetic_model  # noqa: E402
from engine.memory import open_experts  # noqa: E402
from engine.memory.budget import fmt_bytes  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.store.dtypes import parse_dtype  # noqa: E402

SHAPE = dict(family="mixtral", num_layers=32, num_experts=8, top_k=2, hidden=1024, intermediate=2816,
             vocab=32000, heads=8, kv_heads=2, head_dim=128)


def generate(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Greedy: (tokens, prompt-eval seconds, decode seconds for n-1 tokens)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(prompt, dtype=torch.long), 0)
        out = [int(logits[-1].argmax())]
        t1 = time.perf_counter()
        pos = len(prompt)
        for _ in range(n - 1):
            logits = model.forward(torch.tensor([out[-1]], dtype=torch.long), pos)
            pos += 1
            out.append(int(logits[-1].argmax()))
        t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def run_config(root: Path, budget: str | None, policy: str | None, args) -> dict:
    dtype = parse_dtype(args.dtype)
    src = open_experts(root, dtype, "cpu", budget, policy, ctx=args.prompt + args.tokens + 8)
    model = load_model(root, dtype=dtype, experts=src, max_seq_len=args.prompt + args.tokens + 8)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(300, SHAPE["vocab"], (args.prompt,), generator=g).tolist()
    tokens, _, _ = generate(model, prompt, args.tokens)  # warm-up (resident: loads every expert used)
    before = src.stats()
    decode, prefill = [], []
    for _ in range(args.runs):
        out, p_s, d_s = generate(model, prompt, args.tokens)
        assert out == tokens, "a run produced different tokens"
        prefill.append(args.prompt / p_s)
        decode.append((args.tokens - 1) / d_s)
    st = src.stats()
    src.close()
    n_tok = args.runs * (args.tokens + args.prompt)
    row = {
        "config": "all resident" if budget is None else f"{budget} {st.policy}",
        "budget": st.budget_note,
        "decode_tok_s": statistics.median(decode),
        "decode_runs": decode,
        "prompt_tok_s": statistics.median(prefill),
        "hit_rate": (st.hits - before.hits) / max(1, st.accesses - before.accesses),
        "mb_loaded_per_token": (st.bytes_loaded - before.bytes_loaded) / 1e6 / n_tok,
        "stall_s_per_run": (st.stall_s - before.stall_s) / args.runs,
        "prefetch_loads": st.prefetch_loads - before.prefetch_loads,
        "prefetch_useful": st.prefetch_useful - before.prefetch_useful,
        "io": st.io,
        "summary": st.summary_line(),
        "tokens": tokens,
    }
    del model
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,lfu,eam")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32",
                    help="compute dtype (the store is bf16; fp32 converts while loading; bf16 matrix-vector "
                         "products are very slow in this CPU build of torch)")
    ap.add_argument("--layers", type=int, default=SHAPE["num_layers"], help="fewer layers for a quick try")
    ap.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    ap.add_argument("--root", default=None, help="store models dir (default: $MOEINF_HOME/models)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    shape = SHAPE | {"num_layers": args.layers, "intermediate": args.intermediate}
    name = "synthetic-mixtral-offload"
    if shape != SHAPE:
        name += f"-{args.layers}x{args.intermediate}"
    root = make_synthetic_model(name, dtype=torch.bfloat16, seed=0, root=args.root, **shape)
    experts = sorted((root / "experts").rglob("*.safetensors"))
    total = sum(p.stat().st_size for p in experts)
    print(f"model {root} ({len(experts)} experts, {fmt_bytes(total)} of experts) ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    rows = [run_config(root, None, None, args)]
    print(f"  {rows[-1]['config']}: {rows[-1]['decode_tok_s']:.2f} tok/s", flush=True)
    failed = []
    for policy in args.policies.split(","):
        try:
            rows.append(run_config(root, args.budget, policy, args))
        except Exception as e:  # noqa: BLE001 - report the policy as failed, measure the others
            failed.append(f"{args.budget} {policy}: {type(e).__name__}: {e}")
            print(f"  {failed[-1]}", flush=True)
            continue
        print(f"  {rows[-1]['config']}: {rows[-1]['decode_tok_s']:.2f} tok/s  ({rows[-1]['summary']})", flush=True)
    ref = rows[0]["tokens"]
    same = all(r["tokens"] == ref for r in rows)

    base = rows[0]["decode_tok_s"]
    print()
    print(f"Mixtral-shaped synthetic model, {args.layers} layers x 8 experts top-2, {fmt_bytes(total)} of bf16 experts, "
          f"{args.dtype} compute, CPU {args.threads} threads, prompt {args.prompt}, {args.tokens} tokens, median of {args.runs}")
    print()
    print("| config | decode tok/s | vs resident | prompt tok/s | expert hit rate | MB read/token | stall s/run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['decode_tok_s']:.2f} | {r['decode_tok_s'] / base:.2f}x | "
              f"{r['prompt_tok_s']:.1f} | {100 * r['hit_rate']:.1f}% | {r['mb_loaded_per_token']:.0f} | "
              f"{r['stall_s_per_run']:.2f} |")
    print()
    print(f"same tokens in every configuration: {same}; budget: {rows[-1]['budget']}; reads: {rows[-1]['io']}")
    for f in failed:
        print(f"FAILED {f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not same or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
