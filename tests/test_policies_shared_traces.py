"""The default policy (eam) against lru, lfu and the token oracle on the real routing traces of
../shared/traces (when present; a clone without them skips these tests).

Demand paging (no prefetch), at 10%, 25% and 50% of all experts cached, on the full Mixtral trace
and FLAME's first two sequences, both as one session ("dev") and held out (each sequence alone, eam
starting from the other's traces): eam loads fewer experts than lru and lfu, and at most 1.05x the
token oracle's loads (1.06x at 50% on these two FLAME sequences, where 1.056-1.059 is measured; the
whole file gives 1.049-1.051, see benchmarks/policies_on_traces.py and the README's policy table).
The oracle is told the rest of each token and every expert's exact rates, more than any causal
policy knows; from 25% of experts cached on it stays above 1.3x Belady, the measured reason a goal
relative to Belady is out of reach.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from engine.policy.oracle import token_oracle_loads
from engine.policy.registry import make_policy
from engine.policy.replay import belady_loads, capacity_for, replay, replay_held_out
from engine.trace.format import RoutingTrace, load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
CASES = {"mixtral": ("mixtral-8x7b-instruct-humaneval0.npz", None), "flame": ("flame-moe-290m.npz", [0, 1])}
pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared/traces is not present in this checkout"
)


@functools.cache
def _trace(case: str) -> RoutingTrace:
    name, sequences = CASES[case]
    trace = load_trace(SHARED / name)
    return trace if sequences is None else trace.select(sequences)


@functools.cache
def _loads(case: str, fraction: float, mode: str) -> dict[str, int]:
    trace = _trace(case)
    cap = capacity_for(fraction, trace.num_layers, trace.num_experts)
    if mode == "dev":
        out = {p: replay(trace, make_policy(p), cap, with_belady=False).loads for p in ("lru", "lfu", "eam")}
        out["oracle"], out["belady"] = token_oracle_loads(trace, cap), belady_loads(trace, cap)
        return out
    out = {p: replay_held_out(trace, p, cap).loads for p in ("lru", "lfu", "eam")}
    alone = [trace.select([i]) for i in range(len(trace.sequences()))]
    out["oracle"] = sum(token_oracle_loads(t, cap) for t in alone)
    out["belady"] = sum(belady_loads(t, cap) for t in alone)
    return out


MODES = [("mixtral", "dev"), ("flame", "dev"), ("flame", "held out")]


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("case,mode", MODES)
def test_eam_loads_fewer_than_lru_and_lfu(case, mode, fraction):
    loads = _loads(case, fraction, mode)
    assert loads["eam"] < loads["lru"] and loads["eam"] < loads["lfu"], loads


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("case,mode", MODES)
def test_eam_is_close_to_the_token_oracle_which_is_far_from_belady(case, mode, fraction):
    loads = _loads(case, fraction, mode)
    bound = 1.06 if case == "flame" and fraction == 0.5 else 1.05
    assert loads["eam"] <= bound * loads["oracle"], loads
    if fraction >= 0.25:
        assert loads["oracle"] > 1.3 * loads["belady"], loads
