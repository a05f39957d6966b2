"""Each cache policy on recorded routing traces, against the token oracle and Belady: markdown tables.

    .venv/bin/python benchmarks/policies_on_traces.py [TRACE_DIR_OR_FILES...] [--fractions 0.1,0.25,0.5]
        [--details] [--prefetch N] [--hint-recall R] [--oracle-lookahead W]

Default traces: ../shared/traces/*.npz. For each trace and cache size (a fraction of all L x E
experts), demand paging (no prefetch), the loads of lru, lfu and eam (the default policy), of the
token oracle of engine/policy/oracle.py (the rest of the current token known exactly, plus exact
per-expert rates: more than any causal predictor knows) and of Belady's optimum, in two modes:

* dev: the whole trace replayed as one session (its sequences one after another, one cache);
* held out (traces with several sequences): each sequence replayed alone with a fresh cache, eam
  starting from the EAM collection of the *other* sequences (what a later session sees); sums.

Columns: loads of each, then eam / lru, eam / lfu, eam / token oracle and eam / Belady.

``--details`` adds the per-row table of the former version: loads, demand misses, prefetch loads,
wasted prefetches and hit rate of lru, lfu, eam, eam with a prefetch allowance per layer (default:
the trace's top-k), eam with an eager prefetch (twice that allowance, probability floor 0.1), with
``--hint-recall`` eam with simulated speculative-gating hints of that recall, and with
``--oracle-lookahead W`` the oracle told every use within W layer steps (impossible in decode).

Deterministic (no timing): one run is the figure. Heavy on 2 shared cores: run under
``flock /tmp/moeinf-heavy.lock``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.policy.oracle import TokenOraclePolicy  # noqa: E402
from engine.policy.registry import make_policy  # noqa: E402
from engine.policy.replay import belady_loads, capacity_for, replay, replay_held_out  # noqa: E402
from engine.trace.format import RoutingTrace, load_trace  # noqa: E402
from engine.trace.hints import simulated_hints  # noqa: E402

SUMMARY = (
    "| trace | mode | cache | Belady | token oracle | lru | lfu | eam | eam / lru | eam / lfu "
    "| eam / oracle | eam / Belady |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
DETAILS = (
    "| trace | cache | policy | loads | demand misses | prefetch loads | wasted | hit rate "
    "| loads / Belady | misses / Belady |\n|---|---|---|---|---|---|---|---|---|---|"
)


def summary_row(name: str, mode: str, frac: float, loads: dict[str, int]) -> str:
    e = loads["eam"]
    ratios = " | ".join(f"{e / loads[k]:.3f}" for k in ("lru", "lfu", "oracle", "belady"))
    cells = " | ".join(str(loads[k]) for k in ("belady", "oracle", "lru", "lfu", "eam"))
    return f"| {name} | {mode} | {frac:.0%} | {cells} | {ratios} |"


def dev_loads(tr: RoutingTrace, cap: int) -> dict[str, int]:
    loads = {p: replay(tr, make_policy(p), cap, with_belady=False).loads for p in ("lru", "lfu", "eam")}
    loads["oracle"] = replay(tr, TokenOraclePolicy(tr), cap, with_belady=False).loads
    loads["belady"] = belady_loads(tr, cap)
    return loads


def held_out_loads(tr: RoutingTrace, cap: int) -> dict[str, int]:
    loads = {p: replay_held_out(tr, p, cap).loads for p in ("lru", "lfu")}
    eam = replay_held_out(tr, "eam", cap)
    loads["eam"], loads["belady"] = eam.loads, eam.belady_loads or 0
    alone = [tr.select([i]) for i in range(len(tr.sequences()))]
    loads["oracle"] = sum(replay(t, TokenOraclePolicy(t), cap, with_belady=False).loads for t in alone)
    return loads


def detail_row(name: str, frac: float, label: str, r, bel: int) -> str:
    return (
        f"| {name} | {frac:.0%} | {label} | {r.loads} | {r.demand_misses} | {r.prefetch_loads} | "
        f"{r.wasted_prefetches} | {r.hit_rate:.3f} | {r.loads / bel:.2f} | {r.demand_misses / bel:.2f} |"
    )


def detail_rows(tr: RoutingTrace, name: str, frac: float, args) -> list[str]:
    cap = capacity_for(frac, tr.num_layers, tr.num_experts)
    bel = belady_loads(tr, cap)
    k = tr.top_k if args.prefetch is None else args.prefetch
    runs = [
        ("lru", "lru", 0, None, {}),
        ("lfu", "lfu", 0, None, {}),
        ("eam", "eam", 0, None, {}),
        (f"eam + prefetch {k}/layer", "eam", k, None, {}),
        (f"eam + eager prefetch {2 * k}/layer (floor 0.1)", "eam", 2 * k, None, {"prefetch_floor": 0.1}),
    ]
    if args.hint_recall is not None:
        hints = simulated_hints(tr, args.hint_recall)
        runs.append((f"eam + prefetch {k} + sim. hints r={args.hint_recall}", "eam", k, hints, {}))
    out = [
        detail_row(name, frac, "token oracle", replay(tr, TokenOraclePolicy(tr), cap, with_belady=False), bel)
    ]
    if args.oracle_lookahead is not None:
        r = replay(tr, TokenOraclePolicy(tr, args.oracle_lookahead), cap, with_belady=False)
        out.append(
            detail_row(name, frac, f"oracle told the next {args.oracle_lookahead} layer steps", r, bel)
        )
    for label, pol, pf, hints, kw in runs:
        r = replay(tr, make_policy(pol, **kw), cap, prefetch_per_layer=pf, hints=hints, with_belady=False)
        out.append(detail_row(name, frac, label, r, bel))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", default=[str(ROOT.parent / "shared" / "traces")])
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--details", action="store_true", help="also the per-row table with prefetch variants")
    ap.add_argument("--prefetch", type=int, default=None, help="with --details: prefetch allowance per layer")
    ap.add_argument("--hint-recall", type=float, default=None, help="with --details: simulated hints")
    ap.add_argument(
        "--oracle-lookahead", type=int, default=None, help="with --details: the oracle told W steps"
    )
    args = ap.parse_args()
    files: list[Path] = []
    for t in args.traces:
        p = Path(t)
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files:
        sys.exit(f"no .npz traces in {args.traces}")
    fractions = [float(x) for x in args.fractions.split(",")]
    print(SUMMARY)
    details: list[str] = []
    for f in files:
        tr = load_trace(f)
        for frac in fractions:
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            print(summary_row(f.stem, "dev", frac, dev_loads(tr, cap)), flush=True)
            if len(tr.sequences()) > 1:
                print(summary_row(f.stem, "held out", frac, held_out_loads(tr, cap)), flush=True)
            if args.details:
                details += detail_rows(tr, f.stem, frac, args)
    if details:
        print("\n" + DETAILS)
        print("\n".join(details))


if __name__ == "__main__":
    main()
