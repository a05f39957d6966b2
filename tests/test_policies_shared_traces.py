"""The eam policy against lru and lfu on the real routing traces of ../shared/traces (when present).

Demand paging (no prefetch): eam must load fewer experts than both lru and lfu at 25% and 50% of
all experts cached. Full Mixtral trace; FLAME's first two sequences (the benchmark,
benchmarks/policies_on_traces.py, covers the whole files and the held-out replays).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.memory.policies import make_policy
from engine.trace.format import load_trace
from engine.trace.replay import capacity_for, replay

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
CASES = [("mixtral-8x7b-instruct-humaneval0.npz", None), ("flame-moe-290m.npz", [0, 1])]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/traces is not present in this checkout")
@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("name,sequences", CASES)
def test_eam_loads_fewer_than_lru_and_lfu(name, sequences, fraction):
    trace = load_trace(SHARED / name)
    if sequences is not None:
        trace = trace.select(sequences)
    cap = capacity_for(fraction, trace.num_layers, trace.num_experts)
    loads = {p: replay(trace, make_policy(p), cap, with_belady=False).loads for p in ("lru", "lfu", "eam")}
    assert loads["eam"] < loads["lru"] and loads["eam"] < loads["lfu"], loads
