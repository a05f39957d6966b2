"""Replacement and prefetch policies: one small interface, several implementations.

A policy sees every access as (token, layer, expert) through ``on_route`` and decides two things:
which resident expert to evict (``victim``) and which experts to load ahead of use (``prefetch``).
The same policy object drives the live cache (``engine/memory``) and the offline replay evaluator
(``engine/policy/replay.py``), so a figure measured offline is the figure of the real run.

Keys are ``(layer, expert)`` pairs over the whole model (one global cache).

Call order for one decode token:  begin_token(); then for each MoE layer l in order:
``on_route(l, experts)`` -> demand loads for misses (each may call ``victim``) -> ``prefetch(l, limit)``
(keys to load in the background, most urgent first; the cache drops those already resident).
``on_hint(l, scores)`` may arrive at any time with early router scores for a later layer l
(speculative gating: the next layer's router applied to the current hidden state).
A prefill chunk of T tokens is one step with ``on_route`` given all its tokens' experts and counts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence

from engine.errors import MoeinfError

Key = tuple[int, int]


class Policy(ABC):
    """Base class. Subclasses override what they need; the defaults prefetch nothing."""

    name = "base"

    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        """Called once before use: model shape and cache capacity (in experts)."""
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity

    def begin_sequence(self) -> None:
        """A new request (prompt) starts."""

    def end_sequence(self) -> None:
        """The request ended (its last token was decoded, or it was stopped)."""

    def begin_token(self) -> None:
        """A new decode step (or prefill chunk) starts."""

    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        """The router of ``layer`` picked ``experts`` (distinct ids; ``counts`` tokens each, if given)."""

    def on_hint(self, layer: int, scores: Sequence[float]) -> None:
        """Early router scores [E] for a later ``layer`` (speculative gating). Optional."""

    def on_load(self, key: Key) -> None:
        """``key`` became resident."""

    def on_evict(self, key: Key) -> None:
        """``key`` left the cache."""

    @abstractmethod
    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        """The resident key to evict; never one in ``pinned`` (in use or needed by this layer)."""

    def prefetch(self, layer: int, limit: int) -> list[Key]:
        """After ``layer`` was routed: up to ``limit`` keys to load ahead, most urgent first."""
        return []


def pick_min(resident: Collection[Key], pinned: Collection[Key], score: Callable[[Key], object]) -> Key:
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
