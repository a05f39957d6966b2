"""Expert Activation Matrices (EAMs) and the collection that keeps representative ones.

An EAM describes one request: for each MoE layer l and expert e, how many tokens were routed to e,
prefill and decode kept apart (``counts[phase, l, e]``, phase 0 = prefill, 1 = decode). Divided by
the phase's token count it is a per-token usage rate (each row sums to top-k).

``EAMCollection`` keeps at most ``capacity`` (default 256) EAMs. A new EAM is merged into its most
similar stored one when that one is nearly identical (cosine >= ``merge_at``) or when the collection
is full; otherwise it is appended. So the stored EAMs stay diverse and representative, and a merged
entry's ``weight`` says how many requests it stands for. Besides the EAMs the collection keeps
cross-layer co-occurrence counts ``transitions[l, e, f]`` (tokens routed to e at layer l and to f at
layer l+1), which predict a token's next-layer experts from its current ones, and running totals
(``requests``, ``tokens``) so merging loses no count.

Matching (``predict``): the running request's partial EAM is compared with every stored EAM by
cosine similarity over the layers seen so far, layers near the one being predicted weighted more;
the best matches' usage rates, weighted by similarity, predict the coming layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PREFILL, DECODE = 0, 1
PHASES = ("prefill", "decode")
DEFAULT_CAPACITY = 256
MAX_TRANSITION_ENTRIES = 4_000_000  # (L-1) * E * E above this: no transition counts (bounded size)


@dataclass
class EAM:
    """One request's activation matrix: counts [2, L, E] (prefill, decode) and tokens [2]."""

    counts: np.ndarray
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> EAM:
        return cls(np.zeros((2, num_layers, num_experts), dtype=np.float32), np.zeros(2, dtype=np.int64))

    @classmethod
    def from_ids(cls, expert_ids: np.ndarray, num_experts: int, phase: int = DECODE) -> EAM:
        """EAM of a token-level routing trace [T, L, k] (-1 ignored), all in one phase."""
        ids = np.asarray(expert_ids)
        eam = cls.empty(ids.shape[1], num_experts)
        eam.add_ids(ids, phase)
        return eam

    def add_ids(self, ids: np.ndarray, phase: int, layer: int | None = None) -> None:
        """Count routing ids [T, L, k] (or [T, k] for one ``layer``)."""
        if layer is not None:
            valid = ids[ids >= 0]
            np.add.at(self.counts[phase, layer], valid, 1.0)
            return
        for ly in range(ids.shape[1]):
            valid = ids[:, ly][ids[:, ly] >= 0]
            np.add.at(self.counts[phase, ly], valid, 1.0)
        self.tokens[phase] += ids.shape[0]

    def rates(self) -> np.ndarray:
        """Per-token usage rate [2, L, E] (counts / tokens of the phase; zeros for an empty phase)."""
        tok = np.maximum(self.tokens, 1).astype(np.float32)[:, None, None]
        return self.counts / tok


def transition_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-occurrence [L-1, E, E]: tokens routed to e at layer l and to f at layer l+1."""
    ids = np.asarray(expert_ids)
    T, L, k = ids.shape
    out = np.zeros((max(L - 1, 0), num_experts, num_experts), dtype=np.float32)
    for ly in range(L - 1):
        a = np.repeat(ids[:, ly, :], k, axis=1).reshape(-1)
        b = np.tile(ids[:, ly + 1, :], (1, k)).reshape(-1)
        ok = (a >= 0) & (b >= 0)
        np.add.at(out[ly], (a[ok], b[ok]), 1.0)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class EAMCollection:
    """Representative, diverse EAMs of past requests of one model, plus transition counts."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        capacity: int = DEFAULT_CAPACITY,
        merge_at: float = 0.995,
        with_transitions: bool = True,
    ):
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, max(1, capacity)
        self.merge_at = merge_at
        self.rates = np.zeros((0, 2, num_layers, num_experts), dtype=np.float32)  # per-token usage rates
        self.weights = np.zeros(0, dtype=np.float64)  # requests each entry stands for
        self._keys: dict[tuple[int, int], np.ndarray] = {}  # unit match keys per (seen, target), cached
        self.requests = 0
        self.tokens = np.zeros(2, dtype=np.int64)
        fits = max(num_layers - 1, 0) * num_experts * num_experts <= MAX_TRANSITION_ENTRIES
        self.transitions: np.ndarray | None = (
            np.zeros((max(num_layers - 1, 0), num_experts, num_experts), dtype=np.float32)
            if with_transitions and fits
            else None
        )

    def __len__(self) -> int:
        return int(self.rates.shape[0])

    # -- building -------------------------------------------------------------------------------
    def add(self, eam: EAM, weight: float = 1.0, requests: int = 1) -> None:
        """Add one request's EAM: merge into the most similar entry when nearly equal or when full."""
        if eam.tokens.sum() == 0:
            return
        self.requests += requests
        self.tokens += eam.tokens
        self._insert(eam.rates().astype(np.float32), weight)

    def _insert(self, rates: np.ndarray, weight: float) -> None:
        self._keys = {}
        if len(self):
            sims = _unit(self.rates.reshape(len(self), -1)) @ _unit(rates.reshape(-1))
            best = int(np.argmax(sims))
            if sims[best] >= self.merge_at or len(self) >= self.capacity:
                w0 = self.weights[best]
                self.rates[best] = (self.rates[best] * w0 + rates * weight) / (w0 + weight)
                self.weights[best] = w0 + weight
                return
        self.rates = np.concatenate([self.rates, rates[None]], axis=0)
        self.weights = np.concatenate([self.weights, [weight]])

    def add_transitions(self, counts: np.ndarray) -> None:
        if self.transitions is not None and counts.shape == self.transitions.shape:
            self.transitions += counts

    def merge(self, other: EAMCollection) -> None:
        """Fold ``other`` into this collection (counts add up; entries merge like ``add``)."""
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError("collections of different model shapes")
        for rates, w in zip(other.rates, other.weights, strict=True):
            self._insert(rates, float(w))
        self.requests += other.requests
        self.tokens += other.tokens
        if other.transitions is not None:
            self.add_transitions(other.transitions)

    # -- predicting -------------------------------------------------------------------------------
    def mean_rates(self) -> np.ndarray | None:
        """Weighted mean usage rate [2, L, E] over all entries (None when empty)."""
        if not len(self):
            return None
        return np.tensordot(self.weights / self.weights.sum(), self.rates, axes=1).astype(np.float32)

    def predict(
        self,
        partial: np.ndarray,
        seen_layers: int,
        target_layer: int,
        phase: int = DECODE,
        top: int = 8,
        sharpness: float = 8.0,
    ) -> np.ndarray | None:
        """Predicted usage rates [L, E] of ``phase`` for a request whose partial rates are ``partial``.

        ``partial``: [2, L, E] the running request's rates so far; ``seen_layers``: how many leading
        layers of it are meaningful (all L once a token has passed every layer); ``target_layer``:
        the layer being predicted next, whose neighbourhood counts most in the similarity. The
        ``top`` most similar entries are averaged with weights exp(sharpness * similarity).
        """
        if not len(self):
            return None
        n = len(self)
        seen = max(1, min(seen_layers, self.num_layers))
        dist = np.abs(np.arange(seen) - target_layer)
        lw = (1.0 / (1.0 + dist)).astype(np.float32)[None, :, None]  # nearer layers weigh more
        q = (partial[:, :seen] * lw).reshape(-1)
        if not np.any(q):
            pick = self.rates[:, phase]
            w = self.weights
        else:
            keys = self._keys.get((seen, target_layer))
            if keys is None:
                keys = _unit((self.rates[:, :, :seen] * lw[None]).reshape(n, -1))
                self._keys[(seen, target_layer)] = keys
            sims = keys @ _unit(q)
            order = np.argsort(-sims)[:top]
            w = np.exp(sharpness * (sims[order] - sims[order[0]])) * np.sqrt(self.weights[order])
            pick = self.rates[order, phase]
        out = np.tensordot(w / w.sum(), pick, axes=1)
        if not np.any(out):  # matched entries have no data in this phase: use the other one
            other = self.rates[:, 1 - phase]
            out = np.tensordot(self.weights / self.weights.sum(), other, axes=1)
        return out.astype(np.float32)

    def next_layer(self, layer: int, experts: np.ndarray) -> np.ndarray | None:
        """P(expert used at layer+1 | a token's experts at ``layer``) [E], or None without data."""
        if self.transitions is None or layer + 1 >= self.num_layers or len(experts) == 0:
            return None
        rows = self.transitions[layer, experts].sum(axis=0)
        total = rows.sum()
        if total <= 0:
            return None
        k = max(1, len(experts))
        return np.minimum(rows * (k / total), 1.0).astype(np.float32)
