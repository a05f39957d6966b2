"""Each cache policy on recorded routing traces, against Belady's optimum: a markdown table.

    .venv/bin/python benchmarks/policies_on_traces.py [TRACE_DIR_OR_FILES...] [--prefetch N]
        [--fractions 0.25,0.5] [--hint-recall R] [--no-holdout] [--oracle-lookahead W]

Default traces: ../shared/traces/*.npz. For each trace and cache size (fraction of all L x E
experts) it replays lru, lfu and eam (demand only), eam with a prefetch allowance per layer (default:
the trace's top-k), eam with an eager prefetch (twice that allowance, probability floor 0.1: fewer
stalls, many more loads), the token oracle of engine/policy/oracle.py (the rest of the current token
known exactly, plus exact per-expert rates: more than any causal predictor knows, so the closest to
Belady an online policy can hope to get), and, with --hint-recall, eam with simulated speculative-gating hints of that
recall (labelled "sim"). Columns: total loads, demand misses, prefetch loads, wasted prefetches,
hit rate, loads / Belady loads, demand misses / Belady loads.

Held-out check (traces with several sequences): each sequence is replayed on its own with a fresh
cache, the eam policy starting from the EAM collection of the *other* sequences (what a second
session sees), next to lru and lfu on the same replays; figures summed over sequences.

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
from engine.policy.replay import belady_loads, capacity_for, count_accesses, replay  # noqa: E402
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection, transition_counts  # noqa: E402
from engine.trace.format import RoutingTrace, load_trace  # noqa: E402
from engine.trace.hints import simulated_hints  # noqa: E402

HEADER = (
    "| trace | cache | policy | loads | demand misses | prefetch loads | wasted | hit rate "
    "| loads / Belady | misses / Belady |\n|---|---|---|---|---|---|---|---|---|---|"
)


def collection_of(trace: RoutingTrace) -> EAMCollection:
    phase = PREFILL if str(trace.meta.get("phase", "")).startswith("prefill") else DECODE
    coll = EAMCollection(trace.num_layers, trace.num_experts)
    for s, e in trace.sequences():
        ids = trace.expert_ids[s:e]
        coll.add(EAM.from_ids(ids, trace.num_experts, phase))
        coll.add_transitions(transition_counts(ids, trace.num_experts))
    return coll


def row(name: str, frac: float, label: str, r, bel: int) -> str:
    return (
        f"| {name} | {frac:.0%} | {label} | {r.loads} | {r.demand_misses} | {r.prefetch_loads} | "
        f"{r.wasted_prefetches} | {r.hit_rate:.3f} | {r.loads / bel:.2f} | {r.demand_misses / bel:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", default=[str(ROOT.parent / "shared" / "traces")])
    ap.add_argument(
        "--prefetch", type=int, default=None, help="prefetch allowance per layer (default: top-k)"
    )
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--hint-recall", type=float, default=None)
    ap.add_argument("--no-holdout", action="store_true")
    ap.add_argument(
        "--oracle-lookahead",
        type=int,
        default=None,
        help="also the oracle told every use within this many layer steps (beyond the token)",
    )
    args = ap.parse_args()
    files: list[Path] = []
    for t in args.traces:
        p = Path(t)
        files += sorted(p.glob("*.npz")) if p.is_dir() else [p]
    if not files:
        sys.exit(f"no .npz traces in {args.traces}")
    fractions = [float(x) for x in args.fractions.split(",")]
    print(HEADER)
    holdout: list[str] = []
    for f in files:
        tr = load_trace(f)
        name = f.stem
        allowance = tr.top_k if args.prefetch is None else args.prefetch
        for frac in fractions:
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            bel = belady_loads(tr, cap)
            print(
                f"| {name} | {frac:.0%} | belady | {bel} | {bel} | 0 | 0 | {1 - bel / max(1, count_accesses(tr)):.3f} | 1.00 | 1.00 |"
            )
            ro = replay(tr, TokenOraclePolicy(tr), cap, with_belady=False)
            print(
                row(name, frac, "token oracle (reference: rest of token known, exact rates)", ro, bel),
                flush=True,
            )
            if args.oracle_lookahead is not None:
                ro = replay(tr, TokenOraclePolicy(tr, args.oracle_lookahead), cap, with_belady=False)
                label = f"oracle told the next {args.oracle_lookahead} layer steps (impossible in decode)"
                print(row(name, frac, label, ro, bel), flush=True)
            runs = [
                ("lru", "lru", 0, None, {}),
                ("lfu", "lfu", 0, None, {}),
                ("eam", "eam", 0, None, {}),
                (f"eam + prefetch {allowance}/layer", "eam", allowance, None, {}),
                (
                    f"eam + eager prefetch {2 * allowance}/layer (floor 0.1)",
                    "eam",
                    2 * allowance,
                    None,
                    {"prefetch_floor": 0.1},
                ),
            ]
            if args.hint_recall is not None:
                hints = simulated_hints(tr, args.hint_recall)
                runs.append(
                    (
                        f"eam + prefetch {allowance} + sim. hints r={args.hint_recall}",
                        "eam",
                        allowance,
                        hints,
                        {},
                    )
                )
            for label, pol, pf, hints, kw in runs:
                r = replay(
                    tr, make_policy(pol, **kw), cap, prefetch_per_layer=pf, hints=hints, with_belady=False
                )
                print(row(name, frac, label, r, bel), flush=True)
            if not args.no_holdout and len(tr.sequences()) > 1:
                holdout += heldout_rows(tr, name, frac, allowance)
    if holdout:
        print(
            "\nHeld out: each sequence replayed alone (fresh cache); eam starts from the other sequences' EAMs.\n"
        )
        print(HEADER)
        print("\n".join(holdout))


def heldout_rows(tr: RoutingTrace, name: str, frac: float, allowance: int) -> list[str]:
    n = len(tr.sequences())
    cap = capacity_for(frac, tr.num_layers, tr.num_experts)
    tests = [tr.select([i]) for i in range(n)]
    bel = sum(belady_loads(t, cap) for t in tests)
    oracle = sum(replay(t, TokenOraclePolicy(t), cap, with_belady=False).loads for t in tests)
    out = [
        f"| {name} (held out) | {frac:.0%} | token oracle (loads only) | {oracle} | {oracle} | 0 | 0 | - | "
        f"{oracle / bel:.2f} | {oracle / bel:.2f} |"
    ]
    for label, pol, pf, with_coll in [
        ("lru", "lru", 0, False),
        ("lfu", "lfu", 0, False),
        ("eam (fresh)", "eam", 0, False),
        ("eam (others' traces)", "eam", 0, True),
        (f"eam (others' traces) + prefetch {allowance}", "eam", allowance, True),
    ]:
        tot = None
        for i, t in enumerate(tests):
            kw = (
                {"collection": collection_of(tr.select([j for j in range(n) if j != i]))} if with_coll else {}
            )
            r = replay(t, make_policy(pol, **kw), cap, prefetch_per_layer=pf, with_belady=False)
            if tot is None:
                tot = r
            else:
                for fld in (
                    "accesses",
                    "loads",
                    "demand_misses",
                    "prefetch_loads",
                    "prefetch_hits",
                    "wasted_prefetches",
                ):
                    setattr(tot, fld, getattr(tot, fld) + getattr(r, fld))
        out.append(row(name + " (held out)", frac, label, tot, bel))
    return out


if __name__ == "__main__":
    main()
