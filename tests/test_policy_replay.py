"""The offline evaluator: replay semantics, prefetch timing, waste accounting, Belady vs brute force."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from engine.errors import MoeinfError
from engine.policy.base import Policy
from engine.policy.lru import LRUPolicy
from engine.policy.replay import belady_loads, capacity_for, count_accesses, replay
from engine.trace.format import RoutingTrace


def trace_of(steps: list[list[list[int]]], num_experts: int, seq_starts=(0,)) -> RoutingTrace:
    """steps[t][l] = expert ids (padded with -1 to the widest)."""
    k = max(len(ids) for tok in steps for ids in tok)
    arr = np.full((len(steps), len(steps[0]), k), -1, dtype=np.int64)
    for t, tok in enumerate(steps):
        for layer, ids in enumerate(tok):
            arr[t, layer, : len(ids)] = ids
    return RoutingTrace(arr, num_experts, np.array(seq_starts))


def brute_force_min_loads(trace: RoutingTrace, capacity: int) -> int:
    """Fewest loads over every eviction choice (demand paging, current step pinned)."""
    steps = [
        tuple(sorted({(layer, int(e)) for e in trace.expert_ids[t, layer] if e >= 0}))
        for t in range(trace.num_tokens)
        for layer in range(trace.num_layers)
    ]

    @functools.cache
    def best(i: int, cache: frozenset) -> int:
        if i == len(steps):
            return 0
        need = set(steps[i])
        missing = [k for k in need if k not in cache]
        evictable = sorted(cache - need)
        overflow = len(cache) + len(missing) - capacity
        if overflow <= 0:
            return len(missing) + best(i + 1, cache | frozenset(missing))
        return len(missing) + min(
            best(i + 1, (cache - frozenset(drop)) | frozenset(missing))
            for drop in itertools.combinations(evictable, overflow)
        )

    return best(0, frozenset())


class Scripted(Policy):
    """Evicts the lowest key; prefetches a fixed list after a given layer."""

    name = "scripted"

    def __init__(self, plan: dict[tuple[int, int], list[tuple[int, int]]]):
        self.plan, self.token = plan, -1

    def begin_token(self) -> None:
        self.token += 1

    def victim(self, resident, pinned):
        return min(k for k in resident if k not in pinned)

    def prefetch(self, layer, limit):
        return self.plan.get((self.token, layer), [])


def test_belady_matches_brute_force_on_small_random_traces():
    rng = np.random.default_rng(1)
    for _ in range(25):
        T, L, E, k = int(rng.integers(3, 7)), int(rng.integers(1, 3)), 3, int(rng.integers(1, 3))
        ids = np.stack([np.stack([rng.choice(E, size=k, replace=False) for _ in range(L)]) for _ in range(T)])
        tr = RoutingTrace(ids, E)
        for cap in range(k, min(L * E, k + 3) + 1):
            assert belady_loads(tr, cap) == brute_force_min_loads(tr, cap), (ids.tolist(), cap)


def test_belady_hand_example():
    # one layer, experts a=0 b=1 c=2, sequence a b c a b, capacity 2: loads a, b, c (evict b: a comes first), b -> 4
    tr = trace_of([[[0]], [[1]], [[2]], [[0]], [[1]]], 3)
    assert belady_loads(tr, 2) == 4
    assert replay(tr, LRUPolicy(), 2).loads == 5  # LRU: a b c(evict a) a(evict b) b(evict c)
    assert belady_loads(tr, 3) == 3


def test_lru_replay_counts_and_hit_rate():
    tr = trace_of([[[0, 1], [2]], [[0, 1], [3]]], 4)
    r = replay(tr, "lru", 3)
    assert r.accesses == 6 == count_accesses(tr)
    # t0: load (0,0) (0,1) (1,2); t1: (0,0) (0,1) hit, (1,3) misses and evicts (1,2)
    assert (r.loads, r.demand_misses, r.prefetch_loads) == (4, 4, 0)
    assert r.hit_rate == pytest.approx(1 - 4 / 6)
    assert r.belady_loads == 4 and r.loads_vs_belady == 1.0


def test_unknown_ids_are_skipped():
    tr = trace_of([[[0, -1]], [[-1, -1]], [[0, 1]]], 2)
    r = replay(tr, "lru", 2)
    assert r.accesses == 3 and r.loads == 2


def test_prefetch_after_layer_is_available_to_the_next_layer():
    tr = trace_of([[[0], [1]], [[0], [1]]], 2)
    # after layer 0 of token 0, prefetch (1, 1): layer 1 then hits
    r = replay(tr, Scripted({(0, 0): [(1, 1)]}), capacity=2, prefetch_per_layer=1)
    assert r.demand_misses == 1 and r.prefetch_loads == 1 and r.prefetch_hits == 1 and r.wasted_prefetches == 0
    assert r.loads == 2


def test_wasted_prefetch_counted_and_allowance_respected():
    tr = trace_of([[[0], [1]], [[0], [1]]], 3)
    plan = {(0, 0): [(1, 2), (1, 0), (1, 1)]}  # allowance 1: only (1, 2) loads, and it is never used
    r = replay(tr, Scripted(plan), capacity=3, prefetch_per_layer=1)
    assert r.prefetch_loads == 1 and r.wasted_prefetches == 1
    assert r.demand_misses == 2


def test_prefetch_never_evicts_the_current_layer_and_capacity_holds():
    tr = trace_of([[[0, 1], [0]]], 2)
    # capacity 2, both slots pinned by layer 0: the prefetch round must stop, not evict them
    r = replay(tr, Scripted({(0, 0): [(1, 0)]}), capacity=2, prefetch_per_layer=1)
    assert r.prefetch_loads == 0 and r.demand_misses == 3


def test_bad_victim_is_a_bug_not_a_silent_success():
    class Bad(LRUPolicy):
        def victim(self, resident, pinned):
            return next(iter(pinned))

    tr = trace_of([[[0]], [[1]], [[0]]], 2)
    with pytest.raises(RuntimeError, match="not evictable"):
        replay(tr, Bad(), 1)


def test_capacity_below_one_layer_is_a_user_error():
    tr = trace_of([[[0, 1, 2]]], 3)
    with pytest.raises(MoeinfError, match="capacity"):
        replay(tr, "lru", 2)


def test_capacity_for_fraction():
    assert capacity_for(0.25, 32, 8) == 64
    assert capacity_for(0.5, 8, 64) == 256
    assert capacity_for(0.0001, 2, 2) == 1


def test_no_policy_beats_belady_even_with_prefetch():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(60, 3, 2))
    tr = RoutingTrace(ids, 6)
    for name in ("lru", "lfu", "eam"):
        for pf in (0, 2):
            r = replay(tr, name, 6, prefetch_per_layer=pf)
            assert r.loads >= r.belady_loads
            assert r.loads == r.demand_misses + r.prefetch_loads
