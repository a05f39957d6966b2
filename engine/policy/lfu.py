"""``lfu``: evict the resident expert routed fewest times so far (demand paging, no prefetch).

Counts run over the policy's whole life (all requests); ties are broken by least recent access.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from engine.policy.base import Key, Policy, pick_min


class LFUPolicy(Policy):
    """Least frequently used (routing count), ties broken by least recent use."""

    name = "lfu"

    def __init__(self) -> None:
        self._clock = 0
        self._freq: dict[Key, int] = {}
        self._last: dict[Key, int] = {}

    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        for e in experts:
            key = (layer, int(e))
            self._clock += 1
            self._freq[key] = self._freq.get(key, 0) + 1
            self._last[key] = self._clock

    def on_load(self, key: Key) -> None:
        if key not in self._last:
            self._clock += 1
            self._last[key] = self._clock

    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        return pick_min(resident, pinned, lambda k: (self._freq.get(k, 0), self._last.get(k, 0)))
