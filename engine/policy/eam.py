"""The trace-driven policy ``eam`` (the default): predict when each expert is next used, evict, prefetch.

For every expert (l, e) and every horizon j = 1..H the policy estimates ``P_j[l, e]``, the
probability that e is used at the j-th next run of layer l, with one small logistic model per
horizon whose weights are learned online: every single-token run of a layer is a labelled example
for each horizon (the features an expert had j runs earlier, and whether the router picked it now).
The features combine what routing history can say about reuse:

* recency, as lag indicators: whether e was used at each of the layer's last W runs. The weights
  learn the shape of the reuse-distance distribution of the model at hand: strong recency (decode
  routing that sticks to its experts), none, or periodic reuse, without a constant fit to a trace;
* the request's usage rate of e (shrunk towards the prior), relative to the prior;
* the prior: the usage rate that past requests like this one predict (``EAMCollection.predict``:
  cosine match of the partial EAM over the layers seen so far, nearer layers weighted more), or the
  session's rate while the collection is empty, relative to uniform routing;
* cross-layer transitions (next run only): for the layers still to come in the current token, the
  experts that tokens routed like this one used at the next layer (transition counts of the collection);
* speculative-gating hints (next run only; ``on_hint(layer, scores)``: the coming layer's router
  applied early to the current hidden state); the hint's excess over the prior, a weight that starts high.

The weights start as a mild recency prior (a fresh policy behaves like LRU weighted by the prior)
and follow the routing: where history predicts reuse the rate features gain weight, where it does
not recency keeps it.

Eviction approximates Belady with the expected next-use distance in layer steps: the distance d0
to layer l's next run, plus L per further run, over the distribution of the first use among the
next H runs (``P_j`` with survival), and past H a geometric tail at the model's rate for run H.
``victim`` evicts the resident expert whose expected next use is farthest. ``prefetch`` proposes the
most likely non-resident experts of the next layers whose next-run probability clears
``prefetch_floor`` and whose expected use comes before that of the resident expert each would displace.

Learning across requests: at each ``begin_sequence`` the finished request's EAM joins the in-memory
collection and every single-token step adds to the transition counts. With ``model_name`` the
persisted collection of that model (``$MOEINF_HOME/traces/<model>/``) is loaded at ``setup``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.policy.base import Key, Policy
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection

# the features after the W lag indicators (the bias is feature 0, the lags 1..W)
X_RATE, X_PRIOR, X_TRANS, X_HINT = range(4)
NUM_EXTRA = 4


def _top_k_of(config: dict | None) -> int | None:
    if not config:
        return None
    try:
        from engine.store.families import moe_layout

        return moe_layout(dict(config)).top_k or None
    except (KeyError, ValueError, TypeError):
        return None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _log_ratio(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    return np.log(np.clip(a, 1e-3, 1.0)) - np.log(np.clip(b, 1e-3, 1.0))


class EAMPolicy(Policy):
    """Trace-driven prefetch and replacement (see the module docstring)."""

    name = "eam"

    def __init__(
        self,
        model_name: str | None = None,
        collection: EAMCollection | None = None,
        learn: bool = True,
        lags: int = 64,
        horizons: int = 32,
        learning_rate: float = 0.03,
        recency_prior: float = 2.0,
        hint_weight: float = 6.0,
        prefetch_floor: float = 0.7,
        prefetch_layers: int = 1,
        transition_trust: float = 32.0,
        transition_depth: int = 1,
        rate_weight: float = 2.0,
        top_k: int | None = None,
        config: dict | None = None,
    ):
        self.model_name = model_name
        self._given = collection
        self.learn = learn
        self.lags, self.horizons = max(1, lags), max(1, horizons)
        self.learning_rate = learning_rate
        self.recency_prior = recency_prior
        self.hint_weight = hint_weight
        self.prefetch_floor = prefetch_floor
        self.prefetch_layers = prefetch_layers
        self.transition_trust = transition_trust
        self.transition_depth = transition_depth
        self.rate_weight = rate_weight
        self._top_k_given = top_k or _top_k_of(config)

    # -- lifecycle ----------------------------------------------------------------------------------
    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        L, E, H = num_layers, num_experts, self.horizons
        coll = self._given
        if coll is None and self.model_name:
            from engine.trace.store import TraceStore

            coll = TraceStore(self.model_name).load_collection(num_layers, num_experts)
        if coll is None or (coll.num_layers, coll.num_experts) != (L, E):
            coll = EAMCollection(L, E)
        self.collection = coll
        self.resident = np.zeros((L, E), dtype=bool)
        self.top_k = self._top_k_given or 1
        self._session_counts = np.zeros((L, E), dtype=np.float32)
        self._session_tokens = 0
        self.weights = np.zeros((H, 1 + self.lags + NUM_EXTRA), dtype=np.float64)
        self._weights_ready = False
        self._hint = np.zeros((L, E), dtype=np.float32)
        self._cur = EAM.empty(L, E)
        self._reset_request()

    def _init_weights(self) -> None:
        """A mild recency prior: P_j starts at the uniform rate, raised by use at the last run (less so
        for later runs) and by the request's and the prior's rates."""
        W = self.lags
        w = np.zeros_like(self.weights)
        w[:, 0] = float(np.log(self.top_k / (self.num_experts - min(self.top_k, self.num_experts - 1))))
        w[:, 1] = self.recency_prior / (1.0 + np.arange(self.horizons))
        w[:, 1 + W + X_RATE] = 1.0
        w[:, 1 + W + X_PRIOR] = 1.0
        w[0, 1 + W + X_TRANS] = 2.0
        w[0, 1 + W + X_HINT] = self.hint_weight
        self.weights = w
        self._weights_ready = True

    def _reset_request(self) -> None:
        L, E, H, W = self.num_layers, self.num_experts, self.horizons, self.lags
        self._used = np.zeros((L, E, W + H), dtype=np.float32)  # [..., 0]: the layer's latest run
        self._extra = np.zeros((L, E, NUM_EXTRA), dtype=np.float32)  # live features after the lags
        self._snaps = np.zeros((L, H, E, NUM_EXTRA), dtype=np.float32)  # _extra after each of the last H runs
        self._runs = np.zeros(L, dtype=np.int64)  # runs of each layer in this request
        self._steps = np.zeros(L, dtype=np.float64)  # tokens behind them (a prefill chunk counts its tokens)
        self._req_counts = np.zeros((L, E), dtype=np.float32)
        self._gap = np.zeros((L, E), dtype=np.float64)  # expected further runs to the next use, per layer
        self._stale = np.ones(L, dtype=bool)
        self._cur = EAM.empty(L, E)
        self._tokens = 0
        self._new_step = True
        self._layer = -1
        self._token_experts: dict[int, np.ndarray] = {}
        self._prior = np.full((L, E), self.top_k / E, dtype=np.float32)
        self._refresh_prior()

    def begin_sequence(self) -> None:
        if self.learn and self._cur.tokens.sum() > 0:
            self.collection.add(self._cur)
        self._reset_request()

    def begin_token(self) -> None:
        self._new_step = True
        self._token_experts = {}
        self._layer = -1
        if self._tokens and self._tokens % 4 == 0:
            self._refresh_prior()

    # -- features -----------------------------------------------------------------------------------
    def _rates(self, layer: int) -> np.ndarray:
        m = self.rate_weight
        return (self._req_counts[layer] + m * self._prior[layer]) / (self._steps[layer] + m)

    def _set_rate_features(self, layer: int) -> None:
        self._extra[layer, :, X_RATE] = _log_ratio(self._rates(layer), self._prior[layer])
        self._extra[layer, :, X_PRIOR] = _log_ratio(self._prior[layer], self.top_k / self.num_experts)
        self._stale[layer] = True

    def _features(self, layer: int, ago: int = 0) -> np.ndarray:
        """[E, F] features of ``layer`` as they were ``ago`` runs ago (0: now)."""
        E, W = self.num_experts, self.lags
        x = np.empty((E, 1 + W + NUM_EXTRA), dtype=np.float64)
        x[:, 0] = 1.0
        x[:, 1 : 1 + W] = self._used[layer, :, ago : ago + W]
        x[:, 1 + W :] = (
            self._extra[layer] if ago == 0 else self._snaps[layer, (self._runs[layer] - ago) % self.horizons]
        )
        return x

    # -- observations ---------------------------------------------------------------------------------
    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        ids = np.fromiter((int(e) for e in experts), dtype=np.int64)
        cnt = np.ones(len(ids), dtype=np.float32) if counts is None else np.asarray(counts, dtype=np.float32)
        multi = bool(len(cnt) and cnt.max() > 1)
        if not multi:
            self.top_k = max(self.top_k, len(ids))
        if not self._weights_ready and (not multi or self._top_k_given):
            self._init_weights()
        self._layer = layer
        step_tokens = max(1.0, float(cnt.sum()) / self.top_k) if multi else 1.0
        phase = PREFILL if multi else DECODE
        if self._new_step:  # the first MoE layer of a step: count its tokens once
            self._new_step = False
            self._tokens += 1
            self._cur.tokens[phase] += int(round(step_tokens))
            self._session_tokens += int(round(step_tokens))
        self._cur.counts[phase, layer, ids] += cnt
        self._session_counts[layer, ids] += cnt
        used = np.zeros(self.num_experts, dtype=np.float32)
        used[ids] = 1.0
        share = used.copy()  # fraction of the step's tokens routed to each expert
        if multi:
            share[ids] = np.minimum(cnt / step_tokens, 1.0)
        if not multi and self.learn and self._weights_ready:
            self._learn(layer, used)
        # this run becomes history: lags shift, rates update, token-specific features are spent
        self._used[layer, :, 1:] = self._used[layer, :, :-1]
        self._used[layer, :, 0] = share
        self._runs[layer] += 1
        self._steps[layer] += step_tokens
        self._req_counts[layer] += share * step_tokens
        self._extra[layer, :, X_TRANS] = 0.0
        self._extra[layer, :, X_HINT] = 0.0
        self._set_rate_features(layer)
        self._snaps[layer, self._runs[layer] % self.horizons] = self._extra[layer]
        if not multi:
            prev = self._token_experts.get(layer - 1)
            if self.learn and prev is not None and self.collection.transitions is not None and len(ids):
                self.collection.transitions[layer - 1][np.ix_(prev, ids)] += 1.0
            self._token_experts[layer] = ids
            self._predict_next_layer(layer, ids)

    def _learn(self, layer: int, used: np.ndarray) -> None:
        """One SGD step per horizon j on this run: the features of j runs ago against what was used now."""
        J = min(self.horizons, int(self._runs[layer]))
        if J == 0:
            return
        W, E = self.lags, self.num_experts
        x = np.empty((J, E, 1 + W + NUM_EXTRA), dtype=np.float64)
        x[..., 0] = 1.0
        windows = np.lib.stride_tricks.sliding_window_view(self._used[layer], W, axis=1)  # [E, H+1, W]
        x[..., 1 : 1 + W] = windows[:, :J].transpose(1, 0, 2)  # j runs ago: the lags from index j-1
        x[0, :, 1 + W :] = self._extra[
            layer
        ]  # the next-run prediction saw this token's transitions and hints
        if J > 1:
            slots = (self._runs[layer] + 1 - np.arange(2, J + 1)) % self.horizons
            x[1:, :, 1 + W :] = self._snaps[layer, slots]
        p = _sigmoid(np.einsum("jef,jf->je", x, self.weights[:J]))
        self.weights[:J] += self.learning_rate / max(self.top_k, 1) * np.einsum("je,jef->jf", used - p, x)

    def on_hint(self, layer: int, scores: Sequence[float]) -> None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != self.num_experts or not 0 <= layer < self.num_layers:
            return
        p = np.exp(s - s.max())
        p = np.minimum(p / p.sum() * self.top_k, 1.0)
        self._hint[layer] = p
        self._extra[layer, :, X_HINT] = p - self._prior[layer]
        self._stale[layer] = True

    def on_load(self, key: Key) -> None:
        self.resident[key] = True

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

    # -- prediction ---------------------------------------------------------------------------------
    def _refresh_prior(self) -> None:
        L, E = self.num_layers, self.num_experts
        pred = None
        if len(self.collection):
            seen = L if self._tokens > 1 else max(self._layer + 1, 1)
            pred = self.collection.predict(self._cur.rates(), seen, min(seen, L - 1))
        if pred is None and self._session_tokens:
            uniform = self.top_k / E
            pred = (self._session_counts + 4.0 * uniform) / (self._session_tokens + 4.0)
        if pred is not None:
            self._prior = np.clip(pred, 0.0, 1.0).astype(np.float32)
            for layer in range(L):
                self._set_rate_features(layer)

    def _predict_next_layer(self, layer: int, ids: np.ndarray) -> None:
        """Transition-based probabilities for this token's coming layers (feature X_TRANS).

        Layer+1 from this token's experts at ``layer``; further layers (up to ``transition_depth``)
        by chaining the prediction through the next transition matrices, which flattens it as it goes.
        """
        tr = self.collection.transitions
        if tr is None or not len(ids):
            return
        cur = np.zeros(self.num_experts, dtype=np.float64)
        cur[ids] = 1.0
        for nl in range(layer + 1, min(layer + 1 + self.transition_depth, self.num_layers)):
            rows = cur @ tr[nl - 1]
            total = float(rows.sum())
            if total <= 0:
                return
            n_obs = total / max(float(cur.sum()), 1e-6) / max(self.top_k, 1)  # tokens behind these rows
            a = n_obs / (n_obs + self.transition_trust)
            pred = np.minimum(rows * (self.top_k / total), 1.0)
            self._extra[nl, :, X_TRANS] = a * (pred - self._prior[nl])
            self._stale[nl] = True
            cur = pred

    def horizon_probabilities(self, layer: int) -> np.ndarray:
        """P(used at the j-th next run of ``layer``) [E, H]."""
        if not self._weights_ready:
            self._init_weights()
        return _sigmoid(self._features(layer) @ self.weights.T)

    def probabilities(self) -> np.ndarray:
        """P(used at the layer's next run) [L, E] for every expert."""
        if not self._weights_ready:
            self._init_weights()
        return np.stack(
            [_sigmoid(self._features(layer) @ self.weights[0]) for layer in range(self.num_layers)]
        )

    def _refresh_gaps(self) -> None:
        """Expected further runs to each stale layer's next use (the first of the next H runs, else a
        geometric tail at the rate the model gives run H)."""
        H = self.horizons
        for layer in np.nonzero(self._stale)[0]:
            P = np.clip(self.horizon_probabilities(int(layer)), 1e-4, 1.0)
            survive = np.cumprod(1.0 - P, axis=1)
            before = np.concatenate([np.ones((P.shape[0], 1)), survive[:, :-1]], axis=1)
            first = (before * P * np.arange(H)).sum(axis=1)
            self._gap[layer] = first + survive[:, -1] * (H + (1.0 - P[:, -1]) / P[:, -1])
            self._stale[layer] = False

    def next_use_distance(self) -> np.ndarray:
        """Expected steps [L, E] until each expert is next needed (layer steps; larger = later)."""
        self._refresh_gaps()
        L = self.num_layers
        d0 = (np.arange(L) - self._layer) % L
        d0[d0 == 0] = L
        return d0.astype(np.float64)[:, None] + L * self._gap

    # -- decisions ----------------------------------------------------------------------------------
    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        dist = self.next_use_distance()
        if len(resident) != int(self.resident.sum()):
            self._resync(resident)
        for _ in range(2):
            mask = self.resident.copy()
            for key in pinned:
                mask[key] = False
            if mask.any():
                flat = int(np.argmax(np.where(mask, dist, -np.inf)))
                key = (flat // self.num_experts, flat % self.num_experts)
                if key in resident:
                    return key
            self._resync(resident)  # out of step with the cache: take what it says, then retry
        return next(k for k in resident if k not in pinned)

    def _resync(self, resident: Collection[Key]) -> None:
        self.resident[:] = False
        for key in resident:
            self.resident[key] = True

    def prefetch(self, layer: int, limit: int) -> list[Key]:
        if limit <= 0:
            return []
        L = self.num_layers
        layers = [(layer + i) % L for i in range(1, self.prefetch_layers + 1)]
        layers += [
            nl for nl in range(layer + 1, L) if self._extra[nl, :, X_HINT].any()
        ]  # hinted further ahead
        dist = self.next_use_distance()
        cands: list[tuple[float, Key]] = []
        for nl in dict.fromkeys(layers):
            p = _sigmoid(self._features(nl) @ self.weights[0])
            for e in np.nonzero((p >= self.prefetch_floor) & ~self.resident[nl])[0]:
                cands.append((float(dist[nl, e]), (nl, int(e))))
        if not cands:
            return []
        cands.sort()
        free = self.capacity - int(self.resident.sum())
        displaced = np.sort(dist[self.resident])[::-1]  # what each prefetch would evict, in turn
        out: list[Key] = []
        for i, (d, key) in enumerate(cands[:limit]):
            j = i - free
            if j >= 0 and (j >= len(displaced) or displaced[j] <= d):
                break
            out.append(key)
        return out
