"""Each cache policy on recorded routing traces, against the token oracle and Belady: markdown tables.

    .venv/bin/python benchmarks/policies_on_traces.py [TRACE_DIR_OR_FILES...] [--fractions 0.1,0.25,0.5]
        [--detail] [--prefetch N] [--hint-recall R] [--no-holdout] [--oracle-lookahead W]

Default traces: ../shared/traces/*.npz. Demand paging through one global cache of a fraction of all
L x E experts. The summary table gives, for each trace and cache size, the loads of Belady (the
offline optimum), the token oracle of engine/policy/oracle.py (the rest of the current token known
exactly, plus each expert's exact use and reuse rates: more than any causal policy knows), lru, lfu
and eam, then eam's loads as a ratio to the oracle's, lru's and lfu's.

Two sets:

* ``dev``: the whole file replayed as one session (the cache and the policy persist across its
  sequences; eam starts with no state).
* ``held out``: each sequence replayed alone with a fresh cache, eam starting from the state a
  previous session would have left in the TraceStore: the EAM collection of the *other* sequences
  and the weights eam learned replaying them (``learned state``); lru, lfu, the oracle and Belady
  on the same replays; figures summed over the sequences. A file of one sequence is cut into two
  halves, each tested with the state learned on the other.

``--detail`` adds the per-policy rows of the dev set (demand misses, prefetch loads, wasted prefetches,
hit rate; eam with a prefetch allowance per layer, default top-k, eam with an eager prefetch, and with
``--hint-recall`` eam with simulated speculative-gating hints of that recall).

Deterministic (no timing): one run is the figure. Heavy on 2 shared cores (a few minutes).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.policy.holdout import heldout_splits, learned_state  # noqa: E402
from engine.policy.oracle import TokenOraclePolicy  # noqa: E402
from engine.policy.registry import make_policy  # noqa: E402
from engine.policy.replay import belady_loads, capacity_for, count_accesses, replay  # noqa: E402
from engine.trace.format import RoutingTrace, load_trace  # noqa: E402
from engine.trace.hints import simulated_hints  # noqa: E402

SUMMARY = (
    "| set | trace | cache | Belady | token oracle | lru | lfu | eam | eam / oracle | eam / lru | eam / lfu |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
HEADER = (
    "| trace | cache | policy | loads | demand misses | prefetch loads | wasted | hit rate "
    "| loads / Belady | misses / Belady |\n|---|---|---|---|---|---|---|---|---|---|"
)


def row(name: str, frac: float, label: str, r, bel: int) -> str:
    return (
        f"| {name} | {frac:.0%} | {label} | {r.loads} | {r.demand_misses} | {r.prefetch_loads} | "
        f"{r.wasted_prefetches} | {r.hit_rate:.3f} | {r.loads / bel:.2f} | {r.demand_misses / bel:.2f} |"
    )


def loads(trace: RoutingTrace, policy, cap: int, **kw) -> int:
    return replay(trace, policy, cap, with_belady=False, **kw).loads


def summary_row(kind: str, name: str, frac: float, bel: int, orc: int, lru: int, lfu: int, eam: int) -> str:
    return (
        f"| {kind} | {name} | {frac:.0%} | {bel} | {orc} | {lru} | {lfu} | {eam} | "
        f"{eam / orc:.3f} | {eam / lru:.3f} | {eam / lfu:.3f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", default=[str(ROOT.parent / "shared" / "traces")])
    ap.add_argument(
        "--prefetch", type=int, default=None, help="prefetch allowance per layer (default: top-k)"
    )
    ap.add_argument("--fractions", default="0.1,0.25,0.5")
    ap.add_argument("--detail", action="store_true", help="also the per-policy rows of the dev set")
    ap.add_argument("--hint-recall", type=float, default=None)
    ap.add_argument("--no-holdout", action="store_true")
    ap.add_argument(
        "--oracle-lookahead",
        type=int,
        default=None,
        help="also the oracle told every use within this many layer steps (beyond the token); with --detail",
    )
    args = ap.parse_args()
    files: list[Path] = []
    for t in args.traces:
        p = Path(t)
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files:
        sys.exit(f"no .npz traces in {args.traces}")
    fractions = [float(x) for x in args.fractions.split(",")]
    summary: list[str] = []
    detail: list[str] = []
    for f in files:
        tr = load_trace(f)
        name = f.stem
        for frac in fractions:
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            bel = belady_loads(tr, cap)
            orc = loads(tr, TokenOraclePolicy(tr), cap)
            lru, lfu, eam = (loads(tr, make_policy(p), cap) for p in ("lru", "lfu", "eam"))
            summary.append(summary_row("dev", name, frac, bel, orc, lru, lfu, eam))
            print(summary[-1], file=sys.stderr, flush=True)
            if args.detail:
                detail += detail_rows(tr, name, frac, args)
        if not args.no_holdout:
            splits = [(test, learned_state(train)) for test, train in heldout_splits(tr)]
            for frac in fractions:
                cap = capacity_for(frac, tr.num_layers, tr.num_experts)
                tot = np.zeros(6, dtype=np.int64)
                for test, state in splits:
                    tot += [
                        belady_loads(test, cap),
                        loads(test, TokenOraclePolicy(test), cap),
                        loads(test, make_policy("lru"), cap),
                        loads(test, make_policy("lfu"), cap),
                        loads(test, make_policy("eam", persist=False, **copy.deepcopy(state)), cap),
                        loads(test, make_policy("eam", persist=False), cap),
                    ]
                summary.append(summary_row("held out", name, frac, *map(int, tot[:5])))
                summary.append(
                    summary_row("held out, eam fresh", name, frac, *map(int, tot[:4]), int(tot[5]))
                )
                print(summary[-2], file=sys.stderr, flush=True)
    print(SUMMARY)
    print("\n".join(summary))
    if detail:
        print()
        print(HEADER)
        print("\n".join(detail))


def detail_rows(tr: RoutingTrace, name: str, frac: float, args) -> list[str]:
    allowance = tr.top_k if args.prefetch is None else args.prefetch
    cap = capacity_for(frac, tr.num_layers, tr.num_experts)
    bel = belady_loads(tr, cap)
    out = [
        f"| {name} | {frac:.0%} | belady | {bel} | {bel} | 0 | 0 | {1 - bel / max(1, count_accesses(tr)):.3f} | 1.00 | 1.00 |"
    ]
    out.append(
        row(name, frac, "token oracle (rest of token known, exact rates)", replay(tr, TokenOraclePolicy(tr), cap, with_belady=False), bel)
    )
    if args.oracle_lookahead is not None:
        ro = replay(tr, TokenOraclePolicy(tr, args.oracle_lookahead), cap, with_belady=False)
        out.append(row(name, frac, f"oracle told the next {args.oracle_lookahead} layer steps (impossible in decode)", ro, bel))
    runs = [
        ("lru", "lru", 0, None, {}),
        ("lfu", "lfu", 0, None, {}),
        ("eam", "eam", 0, None, {}),
        (f"eam + prefetch {allowance}/layer", "eam", allowance, None, {}),
        (f"eam + eager prefetch {2 * allowance}/layer (floor 0.1)", "eam", 2 * allowance, None, {"prefetch_floor": 0.1}),
    ]
    if args.hint_recall is not None:
        hints = simulated_hints(tr, args.hint_recall)
        runs.append((f"eam + prefetch {allowance} + sim. hints r={args.hint_recall}", "eam", allowance, hints, {}))
    for label, pol, pf, hints, kw in runs:
        r = replay(tr, make_policy(pol, **kw), cap, prefetch_per_layer=pf, hints=hints, with_belady=False)
        out.append(row(name, frac, label, r, bel))
    return out


if __name__ == "__main__":
    main()
