"""Held-out evaluation of a policy on recorded traces: what a *second* session sees.

``heldout_splits(trace)`` pairs each sequence (the test, replayed alone with a fresh cache) with the
other sequences (what an earlier session served); a trace of one sequence is cut into two halves,
each tested against the other. ``learned_state(train)`` is what that earlier session leaves in the
TraceStore for ``eam``: the EAM collection of its requests (``collection_of``) and the weights eam
learned serving them; pass it to ``make_policy("eam", persist=False, **learned_state(train))``
(the policy adds to the collection it is given, so give each replay its own: ``learned_state``
returns a new one each call, ``copy.deepcopy`` for reuse).
"""

from __future__ import annotations

import numpy as np

from engine.policy.eam import EAMPolicy
from engine.policy.replay import capacity_for, replay
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection, transition_counts
from engine.trace.format import RoutingTrace


def collection_of(trace: RoutingTrace) -> EAMCollection:
    """The EAM collection (and transition counts) a session recording ``trace`` would persist."""
    phase = PREFILL if str(trace.meta.get("phase", "")).startswith("prefill") else DECODE
    coll = EAMCollection(trace.num_layers, trace.num_experts)
    for s, e in trace.sequences():
        ids = trace.expert_ids[s:e]
        coll.add(EAM.from_ids(ids, trace.num_experts, phase))
        coll.add_transitions(transition_counts(ids, trace.num_experts))
    return coll


def heldout_splits(trace: RoutingTrace) -> list[tuple[RoutingTrace, RoutingTrace]]:
    """(test, train) pairs: each sequence against the others; one sequence: its two halves."""
    n = len(trace.sequences())
    if n > 1:
        return [(trace.select([i]), trace.select([j for j in range(n) if j != i])) for i in range(n)]
    half = trace.num_tokens // 2
    halves = RoutingTrace(trace.expert_ids, trace.num_experts, np.array([0, half]), dict(trace.meta))
    return [(halves.select([0]), halves.select([1])), (halves.select([1]), halves.select([0]))]


def learned_state(train: RoutingTrace) -> dict:
    """``collection=`` and ``weights=`` for eam after a session that served ``train`` (the weights are
    learned from the routing alone, so the cache size of that session does not matter)."""
    pol = EAMPolicy(persist=False)
    replay(train, pol, capacity_for(0.5, train.num_layers, train.num_experts), with_belady=False)
    return {"collection": collection_of(train), "weights": pol.weights.copy()}
