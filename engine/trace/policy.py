"""The trace-driven policy ``eam`` (the default): predict each expert's next use, prefetch, evict.

For every expert (l, e) the policy estimates the probability that it is used the next time layer l
runs, from three sources combined:

* the running request's own history: a recency-weighted per-token usage rate of each expert (an
  exponential moving average over tokens), blended with the rate the EAM collection predicts for
  requests like this one (``EAMCollection.predict``: cosine match of the partial EAM over the layers
  seen so far, nearer layers weighted more);
* for the layers still to come in the current token: the cross-layer transition counts of the
  collection (a token's experts at layer l predict its experts at l+1, chained a few layers ahead);
* speculative-gating hints (``on_hint(layer, scores)``: the coming layer's router applied early to
  the current hidden state), which, when present, dominate the prediction of that layer.

From these probabilities it derives an expected next-use distance in layer steps (Belady
approximated): distance to the layer's next run, plus, if not used then, L steps per expected token
until use (1 / rate). ``victim`` evicts the resident expert with the farthest expected next use;
``prefetch`` loads the most likely experts of the next layers, but only those whose expected next
use is sooner than that of the expert they would displace and whose probability clears a floor.

The policy learns online: at each ``begin_sequence`` the finished request's EAM joins its in-memory
collection, and every single-token step adds to the transition counts. A persisted collection (the
model's traces under ``$MOEINF_HOME/traces/<model>/``) is loaded at ``setup`` when ``model_name``
is given.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.memory.policy import Key, Policy
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection


class EAMPolicy(Policy):
    """Trace-driven prefetch and replacement (see the module docstring)."""

    name = "eam"

    def __init__(
        self,
        model_name: str | None = None,
        collection: EAMCollection | None = None,
        learn: bool = True,
        ema_decay: float = 0.9,
        prior_tokens: float = 8.0,
        hint_weight: float = 0.75,
        horizon: int = 2,
        prefetch_floor: float = 0.3,
        transition_trust: float = 64.0,
    ):
        self.model_name = model_name
        self._given = collection
        self.learn = learn
        self.ema_decay = ema_decay
        self.prior_tokens = prior_tokens
        self.hint_weight = hint_weight
        self.horizon = horizon
        self.prefetch_floor = prefetch_floor
        self.transition_trust = transition_trust

    # -- lifecycle ----------------------------------------------------------------------------------
    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        L, E = num_layers, num_experts
        coll = self._given
        if coll is None and self.model_name:
            from engine.trace.store import TraceStore

            coll = TraceStore(self.model_name).load_collection(num_layers, num_experts)
        if coll is None or (coll.num_layers, coll.num_experts) != (L, E):
            coll = EAMCollection(L, E)
        self.collection = coll
        self.resident = np.zeros((L, E), dtype=bool)
        self.top_k = 1
        self._session_counts = np.zeros((L, E), dtype=np.float32)
        self._session_tokens = 0
        self._cur = EAM.empty(L, E)
        self._prior: np.ndarray | None = None
        self._hint = np.zeros((L, E), dtype=np.float32)
        self._has_hint = np.zeros(L, dtype=bool)
        self._reset_request()

    def _reset_request(self) -> None:
        L, E = self.num_layers, self.num_experts
        self._ema = np.zeros((L, E), dtype=np.float32)
        self._ema_mass = np.zeros(L, dtype=np.float32)
        self._cur = EAM.empty(L, E)
        self._tokens = 0
        self._layer = -1
        self._layer_steps = np.zeros(L, dtype=np.int64)
        self._token_experts: dict[int, np.ndarray] = {}
        self._ahead = np.full((L, E), np.nan, dtype=np.float32)  # this token's predictions, layers ahead
        self._refresh_prior()

    def begin_sequence(self) -> None:
        if self.learn and self._cur.tokens.sum() > 0:
            self.collection.add(self._cur)
        self._reset_request()

    def begin_token(self) -> None:
        self._token_experts = {}
        self._ahead[:] = np.nan
        self._layer = -1
        if self._tokens and self._tokens % 4 == 0:
            self._refresh_prior()

    # -- observations ---------------------------------------------------------------------------------
    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        ids = np.fromiter((int(e) for e in experts), dtype=np.int64)
        cnt = np.ones(len(ids), dtype=np.float32) if counts is None else np.asarray(counts, dtype=np.float32)
        multi = bool(len(cnt) and cnt.max() > 1)
        phase = PREFILL if multi else DECODE
        step_tokens = float(cnt.sum() / max(len(ids), 1)) if multi else 1.0
        if not multi:
            self.top_k = max(self.top_k, len(ids))
        self._layer = layer
        if layer == 0 or not self._layer_steps.any():
            self._tokens += 1
            self._cur.tokens[phase] += max(1, int(round(cnt.sum() / max(self.top_k, 1)))) if multi else 1
        self._layer_steps[layer] += 1
        self._cur.counts[phase, layer, ids] += cnt
        self._session_counts[layer, ids] += cnt
        if layer == 0:
            self._session_tokens += 1
        d = self.ema_decay ** step_tokens
        self._ema[layer] *= d
        self._ema_mass[layer] = self._ema_mass[layer] * d + (1.0 - d)
        self._ema[layer, ids] += (1.0 - d) * np.minimum(cnt / step_tokens, 1.0)
        self._has_hint[layer] = False
        if not multi:
            prev = self._token_experts.get(layer - 1)
            if self.learn and prev is not None and self.collection.transitions is not None and len(ids):
                self.collection.transitions[layer - 1][np.ix_(prev, ids)] += 1.0
            self._token_experts[layer] = ids
            self._predict_ahead(layer, ids)

    def on_hint(self, layer: int, scores: Sequence[float]) -> None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != self.num_experts or not 0 <= layer < self.num_layers:
            return
        p = np.exp(s - s.max())
        p = p / p.sum() * self.top_k
        self._hint[layer] = np.minimum(p, 1.0).astype(np.float32)
        self._has_hint[layer] = True
        self._ahead[layer] = self._combine_next(layer, self._ahead[layer])

    def on_load(self, key: Key) -> None:
        self.resident[key] = True

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

    # -- prediction ---------------------------------------------------------------------------------
    def _refresh_prior(self) -> None:
        partial = self._cur.rates()
        seen = self.num_layers if self._tokens > 1 else max(self._layer + 1, 1)
        self._prior = self.collection.predict(partial, seen, min(seen, self.num_layers - 1))

    def rates(self) -> np.ndarray:
        """Per-token usage rate [L, E] of every expert for the running request (best estimate)."""
        L, E = self.num_layers, self.num_experts
        uniform = np.full((L, E), self.top_k / E, dtype=np.float32)
        base = uniform
        if self._session_tokens:
            sess = self._session_counts / max(self._session_tokens, 1)
            base = (sess * self._session_tokens + uniform * 4.0) / (self._session_tokens + 4.0)
        if self._prior is not None:
            base = 0.5 * base + 0.5 * self._prior
        mass = self._ema_mass[:, None]
        ema = np.where(mass > 0, self._ema / np.maximum(mass, 1e-6), 0.0)
        w = (self._tokens / (self._tokens + self.prior_tokens)) * np.minimum(mass * 10.0, 1.0)
        return (w * ema + (1.0 - w) * base).astype(np.float32)

    def _combine_next(self, layer: int, from_history: np.ndarray) -> np.ndarray:
        if not self._has_hint[layer]:
            return from_history
        h = self._hint[layer]
        base = np.nan_to_num(from_history, nan=0.0)
        return (self.hint_weight * h + (1.0 - self.hint_weight) * base).astype(np.float32)

    def _predict_ahead(self, layer: int, ids: np.ndarray) -> None:
        """This token's usage probabilities for layers layer+1 .. layer+horizon."""
        rates = None
        cur = np.zeros(self.num_experts, dtype=np.float32)
        cur[ids] = 1.0
        for nl in range(layer + 1, min(layer + 1 + self.horizon, self.num_layers)):
            tr = self.collection.transitions
            if rates is None:
                rates = self.rates()
            base = rates[nl]
            if tr is not None:
                rows = cur @ tr[nl - 1]
                total = float(rows.sum())
                if total > 0:
                    pred = rows * (float(cur.sum()) / total)
                    n_obs = total / max(float(cur.sum()), 1.0)
                    a = n_obs / (n_obs + self.transition_trust)
                    base = a * np.minimum(pred, 1.0) + (1.0 - a) * base
            nxt = self._combine_next(nl, base) if nl == layer + 1 else base
            self._ahead[nl] = nxt
            cur = nxt

    def next_use_distance(self) -> np.ndarray:
        """Expected steps [L, E] until each expert is next needed (layer steps; larger = later)."""
        L = self.num_layers
        rates = np.maximum(self.rates(), 1e-4)
        here = self._layer
        d0 = (np.arange(L) - here) % L
        d0[d0 == 0] = L
        d0 = d0.astype(np.float32)[:, None]
        p0 = np.where(np.isnan(self._ahead), rates, self._ahead)
        hinted = self._has_hint[:, None]
        p0 = np.where(hinted & np.isnan(self._ahead), self._hint, p0)
        return d0 + (1.0 - np.clip(p0, 0.0, 1.0)) * (L / rates)

    # -- decisions ----------------------------------------------------------------------------------
    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        dist = self.next_use_distance()
        mask = self.resident.copy()
        for key in pinned:
            mask[key] = False
        if not mask.any() or not all(self.resident[k] for k in resident):
            self.resident[:] = False  # out of sync with the cache: rebuild from what it says
            for key in resident:
                self.resident[key] = True
            mask = self.resident.copy()
            for key in pinned:
                mask[key] = False
        score = np.where(mask, dist, -np.inf)
        flat = int(np.argmax(score))
        key = (flat // self.num_experts, flat % self.num_experts)
        if key not in resident or key in pinned:
            candidates = [k for k in resident if k not in pinned]
            key = max(candidates, key=lambda k: dist[k])
        return key

    def prefetch(self, layer: int, limit: int) -> list[Key]:
        if limit <= 0:
            return []
        dist = self.next_use_distance()
        nxt = [nl for nl in range(layer + 1, min(layer + 1 + self.horizon, self.num_layers))]
        if not nxt and layer == self.num_layers - 1:
            nxt = [0]
        cands: list[tuple[float, Key]] = []
        for nl in nxt:
            p = self._ahead[nl] if not np.isnan(self._ahead[nl]).all() else self.rates()[nl]
            if self._has_hint[nl]:
                p = self._combine_next(nl, p)
            for e in np.nonzero((p >= self.prefetch_floor) & ~self.resident[nl])[0]:
                cands.append((float(dist[nl, e]), (nl, int(e))))
        if not cands:
            return []
        cands.sort()
        # the experts these would displace: resident ones, farthest expected use first
        free = self.capacity - int(self.resident.sum())
        res_d = np.sort(dist[self.resident])[::-1]
        out: list[Key] = []
        for i, (d, key) in enumerate(cands[:limit]):
            j = i - free
            if j >= 0 and (j >= len(res_d) or res_d[j] <= d):
                break
            out.append(key)
        return out
