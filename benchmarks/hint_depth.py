"""Speculative gating one, two or three MoE layers ahead, on the demo model with a 25% expert budget.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/hint_depth.py [--depths 1,2,3] [--reps 2]

Needs the demo model in the store (``make demo`` builds ``smollm2-moe``). Part 1: recall of the
coming layers' routers applied to this layer's router input (top-k of the hint against the experts
the layer then picked), over greedy answers to a few prompts. Part 2: the same answers decoded with
hints for 1, 2, 3 layers ahead (``OffloadedExperts.hint_depth``), runs alternating; printed are the
medians of decode tokens/s, time stalled on loads, hit rate and prefetch counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.memory.hints import RouterHints  # noqa: E402
from engine.memory.offload import OffloadedExperts  # noqa: E402
from engine.store.families import get_family  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "List three uses of copper and say why.",
    "Tell me a story about a fox.",
]


def recall_by_depth(model: str, depths: list[int], tokens: int) -> dict[int, float]:
    seen: list[tuple[int, list[int], torch.Tensor]] = []
    observe = OffloadedExperts.observe

    def recording(self, layer, topk_ids, hidden):
        if topk_ids.dim() == 1 or topk_ids.shape[0] == 1:
            seen.append((layer, topk_ids.reshape(-1).tolist(), hidden[-1].detach().clone()))
        return observe(self, layer, topk_ids, hidden)

    OffloadedExperts.observe = recording
    try:
        s = engine.load(model, expert_budget="25%")
        for p in PROMPTS:
            for _ in s.generate(p, temperature=0, num_predict=tokens):
                pass
        s.experts.close()
    finally:
        OffloadedExperts.observe = observe
    hints = s.experts.hints or RouterHints(
        s.store.dense, sorted({layer for layer, _, _ in seen}), get_family(s.info()["family"])
    )
    steps: list[dict[int, tuple[list[int], torch.Tensor]]] = [{}]
    for layer, ids, h in seen:
        if layer in steps[-1]:
            steps.append({})
        steps[-1][layer] = (ids, h)
    out = {}
    for d in depths:
        hit = total = 0
        for step in steps:
            for layer, (_, h) in step.items():
                ahead = hints.ahead(layer, d)
                if len(ahead) < d or ahead[-1] not in step:
                    continue
                true = step[ahead[-1]][0]
                top = torch.tensor(hints.scores(ahead[-1], h)).topk(len(true)).indices.tolist()
                hit += len(set(top) & set(true))
                total += len(true)
        out[d] = hit / max(total, 1)
    return out


def decode_with_depth(model: str, depth: int, tokens: int) -> tuple[float, float, float, int, int, int]:
    s = engine.load(model, expert_budget="25%")
    s.experts.hint_depth = depth
    eval_s = 0.0
    n = 0
    for p in PROMPTS:
        for item in s.generate(p, temperature=0, num_predict=tokens):
            if not isinstance(item, str):
                eval_s += item.eval_s
                n += item.generated_tokens
    st = s.experts.stats()
    s.experts.close()
    return n / eval_s, st.stall_s, st.hits / max(st.accesses, 1), st.prefetch_loads, st.prefetch_useful, st.prefetch_wasted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    depths = [int(x) for x in args.depths.split(",")]
    rec = recall_by_depth(args.model, depths, args.tokens)
    print("hint recall (top-k of the early router scores vs the experts picked): "
          + ", ".join(f"{d} ahead {r:.3f}" for d, r in rec.items()))
    runs: dict[int, list[tuple]] = {d: [] for d in depths}
    for _ in range(args.reps):
        for d in depths:
            runs[d].append(decode_with_depth(args.model, d, args.tokens))
    print("| hint depth | decode tok/s | stalled s | hit rate | prefetch loads | useful | wasted |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for d in depths:
        med = [statistics.median(r[i] for r in runs[d]) for i in range(6)]
        print(f"| {d} | {med[0]:.2f} | {med[1]:.1f} | {med[2]:.3f} | {med[3]:.0f} | {med[4]:.0f} | {med[5]:.0f} |")


if __name__ == "__main__":
    main()
