"""``lru``: evict the resident expert whose last access is oldest (demand paging, no prefetch).

An access is a routing decision (``on_route``); a load counts as an access too, so a just-loaded
expert is not the next victim.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from engine.policy.base import Key, Policy, pick_min


class LRUPolicy(Policy):
    """Least recently used."""

    name = "lru"

    def __init__(self) -> None:
        self._clock = 0
        self._last: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        for e in experts:
            self._touch((layer, int(e)))

    def on_load(self, key: Key) -> None:
        if key not in self._last:
            self._touch(key)

    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        return pick_min(resident, pinned, lambda k: self._last.get(k, 0))
