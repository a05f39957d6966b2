"""Policies: the registry, LRU/LFU semantics, invariants of every policy, the eam policy's sources."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import MoeinfError
from engine.policy.eam import EAMPolicy
from engine.policy.lfu import LFUPolicy
from engine.policy.lru import LRUPolicy
from engine.policy.registry import DEFAULT_POLICY, POLICY_NAMES, make_policy, policy_choices
from engine.policy.replay import replay
from engine.trace.eam import EAM, EAMCollection, transition_counts
from engine.trace.format import RoutingTrace
from engine.trace.hints import simulated_hints


def test_registry_names_default_and_unknown():
    assert set(POLICY_NAMES) == {"lru", "lfu", "eam"}
    assert DEFAULT_POLICY == "eam"
    assert make_policy(None).name == "eam"
    for name in POLICY_NAMES:
        assert make_policy(name.upper(), model_name=None, unused=1).name == name
    with pytest.raises(MoeinfError) as err:
        make_policy("fifo")
    msg = str(err.value)
    assert "\n" not in msg and "fifo" in msg and "lru, lfu, eam" in msg
    assert policy_choices() == "lru, lfu or eam"
    assert LRUPolicy.name == "lru" and LFUPolicy.name == "lfu" and EAMPolicy.name == "eam"


def test_lru_evicts_least_recent_never_pinned():
    p = LRUPolicy()
    p.setup(2, 4, 3)
    for key in [(0, 1), (0, 2), (1, 3)]:
        p.on_route(key[0], [key[1]])
        p.on_load(key)
    resident = {(0, 1), (0, 2), (1, 3)}
    assert p.victim(resident, pinned=set()) == (0, 1)
    assert p.victim(resident, pinned={(0, 1)}) == (0, 2)
    p.on_route(0, [1])  # (0, 1) is now the most recent
    assert p.victim(resident, pinned=set()) == (0, 2)


def test_lfu_evicts_least_frequent_ties_by_recency():
    p = LFUPolicy()
    p.setup(1, 4, 3)
    for e in [0, 0, 1, 2, 0, 2]:
        p.on_route(0, [e])
    resident = {(0, 0), (0, 1), (0, 2)}
    assert p.victim(resident, set()) == (0, 1)
    p.on_route(0, [1])  # 1 and 2 both twice; 2 less recent now
    assert p.victim(resident, set()) == (0, 2)
    assert p.victim(resident, {(0, 2), (0, 1)}) == (0, 0)


def test_every_key_pinned_is_a_one_line_error():
    p = LRUPolicy()
    p.setup(1, 2, 1)
    with pytest.raises(MoeinfError, match="budget"):
        p.victim({(0, 0)}, {(0, 0)})


def _random_trace(seed: int, T=80, L=4, E=8, k=2, seqs=3) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, size=k, replace=False) for _ in range(L)]) for _ in range(T)])
    return RoutingTrace(ids, E, np.linspace(0, T, seqs, endpoint=False).astype(int))


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("prefetch", [0, 3])
def test_invariants_under_replay(name, prefetch):
    """The replay raises on a pinned/non-resident victim, an out-of-model prefetch or overflow."""
    tr = _random_trace(7)
    hints = simulated_hints(tr, 0.7) if name == "eam" else None
    for cap in (2, 5, 16):
        r = replay(tr, make_policy(name), cap, prefetch_per_layer=prefetch, hints=hints)
        assert r.loads == r.demand_misses + r.prefetch_loads >= r.belady_loads
        assert r.prefetch_hits + r.wasted_prefetches <= r.prefetch_loads
        if name != "eam":
            assert r.prefetch_loads == 0


def test_eam_policy_handles_prefill_chunks_and_resync():
    p = EAMPolicy()
    p.setup(3, 8, 6)
    p.begin_sequence()
    p.begin_token()
    for layer in range(3):  # a prefill chunk: many tokens, counts above 1
        p.on_route(layer, [0, 1, 2, 5], [3, 1, 2, 2])
    for layer, e in [(0, 0), (0, 1), (1, 2), (2, 5), (1, 0), (2, 1)]:
        p.on_load((layer, e))
    resident = {(0, 0), (0, 1), (1, 2), (2, 5), (1, 0), (2, 1)}
    v = p.victim(resident, pinned={(2, 5), (2, 1)})
    assert v in resident and v not in {(2, 5), (2, 1)}
    # the cache says something else is resident than the policy was told: it follows the cache
    other = {(0, 3), (1, 4), (2, 6)}
    assert p.victim(other, pinned={(2, 6)}) in {(0, 3), (1, 4)}
    assert all(0 <= k[0] < 3 and 0 <= k[1] < 8 for k in p.prefetch(0, 4))


def test_hints_drive_prefetch():
    """With accurate speculative-gating hints, prefetching removes most demand misses."""
    tr = _random_trace(11, T=120, L=4, E=16, k=2, seqs=1)
    cap = 16
    plain = replay(tr, EAMPolicy(), cap, prefetch_per_layer=2)
    hinted = replay(tr, EAMPolicy(), cap, prefetch_per_layer=2, hints=simulated_hints(tr, 1.0))
    assert hinted.demand_misses < 0.5 * plain.demand_misses
    assert hinted.prefetch_hits > 0.8 * hinted.prefetch_loads


def test_hints_two_layers_ahead_are_prefetched():
    """A confident hint for layer l+2 (speculative gating two layers ahead) is prefetched after layer l."""
    p = EAMPolicy()
    p.setup(6, 8, 12)
    p.begin_sequence()
    p.begin_token()
    p.on_route(0, [0, 1])
    scores = np.full(8, -10.0)
    scores[[5, 6]] = 10.0
    p.on_hint(2, scores)
    assert {(2, 5), (2, 6)} <= set(p.prefetch(0, 8))
    p.on_route(1, [0, 1])
    p.on_route(2, [5, 6])  # the hint is spent once its layer has run
    assert not any(k[0] == 2 for k in p.prefetch(2, 8))


def test_collection_prior_helps_a_repeating_workload():
    """Routing that repeats across requests: a policy starting from past EAMs misses less than a fresh one."""
    rng = np.random.default_rng(5)
    L, E, k = 4, 16, 2
    hot = [rng.choice(E, size=(L, 4)) for _ in range(2)]  # two kinds of request, 4 hot experts per layer

    def request(kind: int, n: int) -> np.ndarray:
        return np.stack([[rng.choice(hot[kind][layer], size=k, replace=False) for layer in range(L)] for _ in range(n)])

    past = [request(i % 2, 30) for i in range(6)]
    coll = EAMCollection(L, E)
    for ids in past:
        coll.add(EAM.from_ids(ids, E))
        coll.add_transitions(transition_counts(ids, E))
    test = RoutingTrace(np.concatenate([request(0, 30), request(1, 30)]), E, np.array([0, 30]))
    fresh = replay(test, EAMPolicy(), 12)
    warm = replay(test, EAMPolicy(collection=coll), 12)
    assert warm.demand_misses < fresh.demand_misses
