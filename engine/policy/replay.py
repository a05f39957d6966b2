"""Offline evaluator: replay a routing trace through a policy and a global expert cache.

The model (the same one the live cache follows, see ``engine/policy/base.py``):

* One global cache of ``capacity`` experts, keyed ``(layer, expert)`` over all L x E experts. It starts
  empty and persists across the trace's sequences (one session serving several requests). The cache
  never holds more than ``capacity`` experts.
* Execution order: sequences, then tokens, then MoE layers 0..L-1 (``begin_sequence`` at each
  ``seq_starts`` and ``end_sequence`` after each sequence's last token, as the live cache calls them;
  ``begin_token`` per token). One step = one (token, layer); the experts it needs are
  the distinct valid ids of ``expert_ids[t, l]`` (-1 = unknown, skipped).
* At step (t, l): ``on_route(l, needed, counts)``; every needed expert not resident is a *demand
  miss*: the computation waits while it loads. To make room the cache asks ``victim(resident,
  pinned)`` with ``pinned`` = the experts this layer needs (in use now); the victim is evicted.
* Then, if ``hints`` are given, ``on_hint(l + 1, hints[t, l + 1])`` (speculative gating: the next
  layer's router on this layer's hidden state; the hint for layer 0 of token t arrives after layer
  L-1 of token t-1). Then ``prefetch(l, allowance)``: up to ``prefetch_per_layer`` experts (those not
  resident, in the policy's order) load while layer l computes, so they are resident from the next
  step (t, l+1) on. A prefetch evicts like a demand load, never an expert pinned by layer l nor one
  prefetched in the same round; if nothing is evictable the round stops.
* ``loads`` = demand misses + prefetch loads. A prefetch is *wasted* when its expert is evicted
  before any use or never used by the end of the trace. Hit rate = 1 - demand misses / accesses,
  where accesses counts (step, needed expert) pairs.
* Belady: the offline optimum of demand paging for the same trace and capacity (evict the resident
  expert whose next use is farthest in the future; experts of the current step are pinned). No
  policy, with or without prefetching, loads fewer experts; with prefetching, demand misses can
  fall below Belady's (its loads equal its misses).
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass

import numpy as np

from engine.errors import MoeinfError
from engine.policy.base import Key, Policy
from engine.trace.format import RoutingTrace


@dataclass
class ReplayResult:
    policy: str
    capacity: int
    prefetch_per_layer: int
    accesses: int
    loads: int
    demand_misses: int
    prefetch_loads: int
    prefetch_hits: int
    wasted_prefetches: int
    belady_loads: int | None = None

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.demand_misses / self.accesses if self.accesses else 1.0

    @property
    def loads_vs_belady(self) -> float | None:
        if self.belady_loads is None:
            return None
        return self.loads / self.belady_loads if self.belady_loads else float(self.loads > 0) or 1.0

    @property
    def belady_hit_rate(self) -> float | None:
        if self.belady_loads is None:
            return None
        return 1.0 - self.belady_loads / self.accesses if self.accesses else 1.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, loads_vs_belady=self.loads_vs_belady)
        return d


def capacity_for(fraction: float, num_layers: int, num_experts: int) -> int:
    """Cache capacity in experts for a fraction of all L x E experts (at least 1)."""
    return max(1, int(round(fraction * num_layers * num_experts)))


def count_accesses(trace: RoutingTrace) -> int:
    """(step, distinct needed expert) pairs of the trace: the denominator of every hit rate."""
    ids = np.sort(trace.expert_ids, axis=-1)
    valid = ids >= 0
    distinct = valid.copy()
    distinct[..., 1:] &= ids[..., 1:] != ids[..., :-1]
    return int(distinct.sum())


def _steps(trace: RoutingTrace):
    """Yield (token, layer, needed expert ids) with ids distinct, in first-seen order, -1 dropped."""
    ids = trace.expert_ids
    for t in range(ids.shape[0]):
        for layer in range(ids.shape[1]):
            row = ids[t, layer]
            yield t, layer, list(dict.fromkeys(int(e) for e in row if e >= 0))


def _check_capacity(trace: RoutingTrace, capacity: int) -> None:
    ids = trace.expert_ids
    widest = max(
        (
            len({int(e) for e in ids[t, layer] if e >= 0})
            for t in range(ids.shape[0])
            for layer in range(ids.shape[1])
        ),
        default=0,
    )
    if capacity < widest:
        raise MoeinfError(
            f"cache capacity {capacity} is below one layer's {widest} experts; raise the capacity"
        )


def replay(
    trace: RoutingTrace,
    policy: Policy | str,
    capacity: int,
    prefetch_per_layer: int = 0,
    hints: np.ndarray | None = None,
    with_belady: bool = True,
    **policy_kw: object,
) -> ReplayResult:
    """Run ``trace`` through ``policy`` (an object or a name for ``make_policy``) and a cache of ``capacity``.

    ``hints``: optional float array [T, L, E] of early router scores for each (token, layer), passed
    to ``on_hint`` one step ahead (see the module docstring).
    """
    if isinstance(policy, str):
        from engine.policy.registry import make_policy

        policy = make_policy(policy, **policy_kw)
    _check_capacity(trace, capacity)
    num_tokens, num_layers = trace.num_tokens, trace.num_layers
    policy.setup(num_layers, trace.num_experts, capacity)
    starts = set(int(s) for s in trace.seq_starts)

    resident: set[Key] = set()
    unused_prefetch: set[Key] = set()
    accesses = demand = pf_loads = pf_hits = wasted = 0

    def evict_for(pinned: set[Key]) -> bool:
        nonlocal wasted
        if len(resident) < capacity:
            return True
        if all(k in pinned for k in resident):
            return False
        key = policy.victim(resident, pinned)
        if key not in resident or key in pinned:
            raise RuntimeError(f"policy {policy.name!r} chose victim {key}, which is not evictable")
        resident.discard(key)
        if key in unused_prefetch:
            unused_prefetch.discard(key)
            wasted += 1
        policy.on_evict(key)
        return True

    for t, layer, needed in _steps(trace):
        if layer == 0:
            if t in starts:
                if t > 0:
                    policy.end_sequence()
                policy.begin_sequence()
            policy.begin_token()
        policy.on_route(layer, needed, [1] * len(needed))
        pinned = {(layer, e) for e in needed}
        for key in pinned:
            accesses += 1
            if key in resident:
                if key in unused_prefetch:
                    unused_prefetch.discard(key)
                    pf_hits += 1
                continue
            demand += 1
            evict_for(pinned)
            resident.add(key)
            policy.on_load(key)
        if hints is not None:
            nt, nl = (t, layer + 1) if layer + 1 < num_layers else (t + 1, 0)
            if nt < num_tokens:
                policy.on_hint(nl, hints[nt, nl])
        if prefetch_per_layer > 0:
            round_pinned = set(pinned)
            moved = 0
            for key in policy.prefetch(layer, prefetch_per_layer):
                if moved >= prefetch_per_layer:
                    break
                key = (int(key[0]), int(key[1]))
                if key in resident:
                    continue
                if not (0 <= key[0] < num_layers and 0 <= key[1] < trace.num_experts):
                    raise RuntimeError(f"policy {policy.name!r} prefetched {key}, outside the model")
                if not evict_for(round_pinned):
                    break
                resident.add(key)
                round_pinned.add(key)
                unused_prefetch.add(key)
                policy.on_load(key)
                pf_loads += 1
                moved += 1
        if len(resident) > capacity:
            raise RuntimeError("cache capacity exceeded")  # the model's invariant; a bug if it fires
    if num_tokens:
        policy.end_sequence()
    wasted += len(unused_prefetch)
    return ReplayResult(
        policy=policy.name,
        capacity=capacity,
        prefetch_per_layer=prefetch_per_layer,
        accesses=accesses,
        loads=demand + pf_loads,
        demand_misses=demand,
        prefetch_loads=pf_loads,
        prefetch_hits=pf_hits,
        wasted_prefetches=wasted,
        belady_loads=belady_loads(trace, capacity) if with_belady else None,
    )


def belady_loads(trace: RoutingTrace, capacity: int) -> int:
    """Loads (= misses) of Belady's optimal demand paging for ``trace`` and a cache of ``capacity``."""
    _check_capacity(trace, capacity)
    steps = [[(layer, e) for e in needed] for _, layer, needed in _steps(trace)]
    never = len(steps)
    # next_use[i][j]: the step at which steps[i][j] is needed next after step i (never = no more use)
    next_use: list[list[int]] = [[] for _ in steps]
    upcoming: dict[Key, int] = {}
    for i in range(len(steps) - 1, -1, -1):
        next_use[i] = [upcoming.get(k, never) for k in steps[i]]
        for k in steps[i]:
            upcoming[k] = i
    resident: dict[Key, int] = {}  # key -> its next use
    heap: list[tuple[int, Key]] = []  # (-next use, key), lazily invalidated
    loads = 0
    for i, keys in enumerate(steps):
        for k in keys:
            if k in resident:
                continue
            loads += 1
            if len(resident) >= capacity:
                while True:
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) == -neg and -neg > i:
                        break
                del resident[victim]
            resident[k] = i
        for k, nxt in zip(keys, next_use[i], strict=True):
            resident[k] = nxt
            heapq.heappush(heap, (-nxt, k))
    return loads


def belady_bypass_loads(trace: RoutingTrace, capacity: int) -> int:
    """Loads of the offline optimum for a cache that may also serve a miss without keeping it (a
    stream slot, as the expert cache does for a step of many tokens): a miss is kept, evicting the
    resident expert needed farthest ahead, only when it is needed again sooner than that one;
    otherwise it streams through. Never more than ``belady_loads``; the yardstick of a batch whose
    every step needs more experts than the cache holds."""
    steps = [[(layer, e) for e in needed] for _, layer, needed in _steps(trace)]
    never = len(steps)
    next_use: list[list[int]] = [[] for _ in steps]
    upcoming: dict[Key, int] = {}
    for i in range(len(steps) - 1, -1, -1):
        next_use[i] = [upcoming.get(k, never) for k in steps[i]]
        for k in steps[i]:
            upcoming[k] = i
    resident: dict[Key, int] = {}  # key -> its next use
    heap: list[tuple[int, Key]] = []  # (-next use, key), lazily invalidated
    loads = 0
    for i, keys in enumerate(steps):
        for k, nxt in zip(keys, next_use[i], strict=True):
            if k in resident:
                resident[k] = nxt
                heapq.heappush(heap, (-nxt, k))
                continue
            loads += 1
            if nxt >= never:
                continue  # not needed again: stream it
            if len(resident) >= capacity:
                while heap and resident.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)  # stale entries
                if not heap or -heap[0][0] <= nxt:
                    continue  # every resident expert is needed sooner: stream it
                _, victim = heapq.heappop(heap)
                del resident[victim]
            resident[k] = nxt
            heapq.heappush(heap, (-nxt, k))
    return loads
