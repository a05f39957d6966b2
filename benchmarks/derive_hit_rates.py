"""Derive the routing model's family defaults (engine/bench/hit_rates.json) from routing traces.

Each trace is replayed (engine.policy.replay) through every policy of the registry at resident
fractions 5%..100% of all experts, cold cache, no prefetch; Belady's optimum is recorded beside. The
spread is the largest distance between the whole trace's hit rate and that of either half of it (how
much the figure moves with the text), which widens the band `moeinf predict` prints. Only these hit
rates are shipped, never the traces (engine/bench/routing.py: derive_table_entry, and how they are used).

    python benchmarks/derive_hit_rates.py /work/shared/traces/mixtral-8x7b-instruct-humaneval0.npz:coarse \
        /work/shared/traces/flame-moe-290m.npz:fine -o engine/bench/hit_rates.json

``coarse``: few large experts (Mixtral-like, <= 16 per layer); ``fine``: many small ones (DeepSeek,
Qwen-MoE, OLMoE, gpt-oss).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from engine.bench.routing import derive_table_entry
from engine.policy.registry import POLICY_NAMES
from engine.trace.format import load_trace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="+", help="TRACE.npz:KIND with KIND coarse or fine")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    table = {"derived_by": "benchmarks/derive_hit_rates.py", "kinds": {}}
    for spec in args.traces:
        path, kind = spec.rsplit(":", 1)
        entry = derive_table_entry(load_trace(path), POLICY_NAMES)
        entry["trace"]["file"] = Path(path).name
        table["kinds"][kind] = entry
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
