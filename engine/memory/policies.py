"""The policy registry and the two classic policies, ``lru`` and ``lfu``.

``make_policy(name, **kw)`` builds a policy by name; ``POLICY_NAMES`` lists the names and
``DEFAULT_POLICY`` is the one used when none is given (the trace-driven ``eam`` policy of
``engine/trace``). Keyword arguments a policy does not take are ignored, so callers can pass the
same context (e.g. ``model_name=``) whatever the name.

Both classic policies only evict; they prefetch nothing (demand paging).

* ``lru``: evict the resident expert whose last access is oldest. An access is a routing decision
  (``on_route``); a load counts as an access too, so a just-loaded expert is not the next victim.
* ``lfu``: evict the resident expert routed fewest times so far (over the policy's whole life, all
  requests), ties broken by least recent access.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence

from engine.errors import MoeinfError
from engine.memory.policy import Key, Policy

POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "eam")
DEFAULT_POLICY = "eam"


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
        return _pick_min(resident, pinned, lambda k: self._last.get(k, 0))


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
        return _pick_min(resident, pinned, lambda k: (self._freq.get(k, 0), self._last.get(k, 0)))


def _pick_min(resident: Collection[Key], pinned: Collection[Key], score: Callable[[Key], object]) -> Key:
    """The unpinned resident key with the smallest score; MoeinfError if every key is pinned."""
    best: Key | None = None
    best_score: object = None
    for key in resident:
        if key in pinned:
            continue
        s = score(key)
        if best is None or s < best_score:  # type: ignore[operator]
            best, best_score = key, s
    if best is None:
        raise MoeinfError(
            "the expert cache is too small for one layer's experts; raise the expert budget (--expert-budget)"
        )
    return best


def _eam_factory(**kw: object) -> Policy:
    from engine.trace.policy import EAMPolicy

    return _construct(EAMPolicy, kw)


def _construct(cls: Callable[..., Policy], kw: dict[str, object]) -> Policy:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls(**kw)
    return cls(**{k: v for k, v in kw.items() if k in params})


_FACTORIES: dict[str, Callable[..., Policy]] = {
    "lru": lambda **kw: _construct(LRUPolicy, kw),
    "lfu": lambda **kw: _construct(LFUPolicy, kw),
    "eam": _eam_factory,
}


def make_policy(name: str | None = None, **kw: object) -> Policy:
    """A new policy object by name (None: ``DEFAULT_POLICY``); unused keyword arguments are ignored."""
    key = (name or DEFAULT_POLICY).strip().lower()
    factory = _FACTORIES.get(key)
    if factory is None:
        raise MoeinfError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    return factory(**kw)
