"""The routing model of ``moeinf predict``: the expert-cache hit rate for a resident fraction and a policy.

Two sources, the first that applies:

* **the model's own traces** (a store model with routing recorded by ``moeinf trace``): its token-level
  routing is replayed (``engine.policy.replay``) through the policy at the capacity of the budget;
* **a family default**: ``hit_rates.json`` beside this module, hit rates per policy at resident
  fractions 5%..100%, replayed from public routing traces by ``benchmarks/derive_hit_rates.py`` (the
  traces are not shipped, only these numbers). "coarse" (a few large experts per layer, Mixtral-like)
  comes from a Mixtral-8x7B decode trace, "fine" (many small experts: DeepSeek, Qwen-MoE, OLMoE,
  gpt-oss) from a FLAME-MoE trace. Between fractions the curve is interpolated linearly.

Replays start cold, so even a cache of every expert misses each expert once; a running model loads
an all-resident set up front and the cold misses belong to the cold start, so the curves are divided
by their value at 100% (the share of accesses that are not first touches). The band is the largest
difference between the whole trace's hit rate and either half's (how much it moves with the text),
capped above by Belady's optimum for the same trace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from engine.policy.replay import belady_loads, capacity_for, count_accesses, replay
from engine.trace.format import RoutingTrace

TABLE = Path(__file__).with_name("hit_rates.json")
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
COARSE_MAX_EXPERTS = 16


@dataclass(frozen=True)
class HitEstimate:
    hit: float
    low: float
    high: float
    source: str  # what it came from, for the user


def _half(trace: RoutingTrace, first: bool) -> RoutingTrace:
    mid = trace.num_tokens // 2
    ids = trace.expert_ids[:mid] if first else trace.expert_ids[mid:]
    return RoutingTrace(expert_ids=ids, num_experts=trace.num_experts)


def _capacity(trace: RoutingTrace, fraction: float) -> int:
    return max(trace.top_k, capacity_for(fraction, trace.num_layers, trace.num_experts))


def trace_curve(trace: RoutingTrace, policy: str, fraction: float) -> tuple[float, float, float]:
    """(hit rate, spread over the halves, Belady's hit rate) of ``trace`` at ``fraction``, cold cache."""
    cap = _capacity(trace, fraction)
    whole = replay(trace, policy, cap, with_belady=False).hit_rate
    halves = [replay(_half(trace, first), policy, cap, with_belady=False).hit_rate for first in (True, False)]
    acc = count_accesses(trace)
    belady = 1 - belady_loads(trace, cap) / acc if acc else 1.0
    return whole, max(abs(h - whole) for h in halves), belady


def derive_table_entry(trace: RoutingTrace, policies: tuple[str, ...]) -> dict:
    """One kind of ``hit_rates.json``: hit rates, spreads and Belady's at each of ``FRACTIONS``."""
    entry: dict = {"fractions": list(FRACTIONS), "policies": {}, "spread": {}, "belady": []}
    for policy in policies:
        rows = [trace_curve(trace, policy, f) for f in FRACTIONS]
        entry["policies"][policy] = [round(r[0], 4) for r in rows]
        entry["spread"][policy] = [round(r[1], 4) for r in rows]
        entry["belady"] = [round(r[2], 4) for r in rows]
    entry["trace"] = {
        "tokens": trace.num_tokens,
        "moe_layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "model": trace.meta.get("model", ""),
    }
    return entry


@cache
def _table() -> dict:
    return json.loads(TABLE.read_text())


def family_kind(num_experts: int) -> str:
    return "coarse" if num_experts <= COARSE_MAX_EXPERTS else "fine"


def from_table(kind: str, policy: str, fraction: float) -> HitEstimate:
    entry = _table()["kinds"][kind]
    xs = entry["fractions"]
    curve = entry["policies"].get(policy) or entry["policies"]["lru"]
    spread = entry["spread"].get(policy) or entry["spread"]["lru"]
    cold = curve[-1] or 1.0
    f = min(max(fraction, 0.0), 1.0)
    hit = float(np.interp(f, [0.0, *xs], [0.0, *curve])) / cold
    s = float(np.interp(f, [0.0, *xs], [0.0, *spread])) / cold
    belady = float(np.interp(f, [0.0, *xs], [0.0, *entry["belady"]])) / cold
    name = entry["trace"].get("model", kind).split(" (")[0]
    return HitEstimate(
        min(hit, 1.0),
        max(0.0, hit - s),
        min(1.0, max(hit, min(belady, hit + s))),
        f"family default ({kind} experts, replayed from a {name} trace)",
    )


def own_traces(store_name: str, num_layers: int, num_experts: int) -> RoutingTrace | None:
    """The token-level routing a store model recorded, or None."""
    from engine.trace.store import TraceStore

    stored = TraceStore(store_name).read()
    if stored is None or stored.raw_ids.shape[0] < 8:
        return None
    if stored.num_layers != num_layers or stored.num_experts != num_experts:
        return None
    return RoutingTrace(stored.raw_ids.astype(np.int64), stored.num_experts, stored.raw_starts)


def estimate(
    fraction: float,
    policy: str,
    num_experts: int,
    trace: RoutingTrace | None = None,
    label: str = "the model's own traces",
) -> HitEstimate:
    """The hit rate at ``fraction`` of all experts resident under ``policy``."""
    if fraction >= 1.0:
        return HitEstimate(1.0, 1.0, 1.0, "all experts resident")
    if trace is not None:
        hit, spread, belady = trace_curve(trace, policy, fraction)
        _, _, cold_belady = trace_curve(trace, policy, 1.0)
        cold = cold_belady or 1.0
        hit, spread, belady = hit / cold, spread / cold, belady / cold
        return HitEstimate(
            min(hit, 1.0),
            max(0.0, hit - spread),
            min(1.0, max(hit, min(belady, hit + spread))),
            f"{label} ({trace.num_tokens} tokens)",
        )
    return from_table(family_kind(num_experts), policy, fraction)
