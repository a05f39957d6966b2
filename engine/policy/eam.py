"""The trace-driven policy ``eam`` (the default): predict each expert's next use, prefetch, evict.

For every expert (l, e) the policy predicts when layer l will next use it, counted in runs of that
layer (one run per token), with one small logistic model per horizon bucket ``H`` in
``HORIZONS`` (1, 2, 4, 8, 16, 32 runs): ``F_H = P(e used at least once in layer l's next H runs)``.
All models share the features of the expert's routing history, taken from the last 64 runs of its
layer in the running request and the sources the papers use:

* recency: whether the expert was used at the layer's last run and the one before, how many runs
  ago it was last used (log scale), its use rate over the last 4, 16 and 64 runs;
* frequency: the request's use rate so far, shrunk towards the prior (below), and for each bucket
  the chance of a use within H runs that this rate alone would give, ``1 - (1 - r)^H``;
* the EAM collection: the usage rate that past requests like this one predict
  (``EAMCollection.predict``: cosine match of the partial EAM over the layers seen so far, nearer
  layers weighted more), or the session's rate while the collection is empty;
* cross-layer transitions: for the layers still to come in the current token, the experts that
  tokens routed like this one used at the next layer (transition counts of the collection);
* speculative-gating hints (``on_hint(layer, scores)``: the coming layer's router applied early to
  the current hidden state), as the hint's excess over the prior, a feature whose weight starts high.

The weights are learned online from the routing itself (every single-token run of a layer labels
the features each expert had H runs earlier, for every bucket), so the policy fits whatever mix
of recency and frequency the model's routing shows: strong recency where the history is short or
does not predict, frequency where it does. The predictions do not depend on the cache size (only
the eviction horizon does), so the same weights serve every budget. Starting weights make the
frequency term alone the prediction; learned weights persist (``TraceStore.write_policy_state``,
``policy-eam.npz`` beside the model's traces, saved at the end of every request) so the next session
starts from them, and can be given (``weights=``).

Eviction keeps what the cache can still use. From the predicted ``F_H`` (made monotone, interpolated
in log2 H between the buckets, extended beyond the last one geometrically at the rate the last two
imply) ``use_within(n)`` is each expert's chance of a use within its layer's next n runs. The cache's
characteristic time (Che's approximation) is the horizon within which the experts expected to be used
number the capacity (``horizon_runs``, solved once per token, times ``horizon_scale``); ``victim``
evicts the resident expert least likely to be used within that horizon (counted in layer steps from
the current layer, so a layer still to come in this token has one more run inside it), ties broken by
the expected next-use distance. That is what a hit needs (a use before the expert would have been
pushed out anyway); the expected distance (``criterion="distance"``) is dominated by the far tail,
which does not matter to a cache of that size. ``prefetch`` proposes the most likely non-resident
experts of the next layers whose probability of use at the next run clears ``prefetch_floor`` and
whose expected use comes before that of the resident expert each would displace.

Cost per routed layer: one update of that layer's E feature rows and one gradient step of the
bucket models over them (a few small matrix products of E x 12 features); ``victim`` is an argmin over [L, E]
scores computed once per routed layer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.policy.base import Key, Policy
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection

HORIZONS = np.array([1, 2, 4, 8, 16, 32])
NB = len(HORIZONS)
RING = int(HORIZONS[-1])  # feature snapshots kept per layer: the longest horizon
WINDOW = 64  # runs of history per expert (one bit each)
# common feature order
(
    F_BIAS,
    F_PREV,
    F_PREV2,
    F_R4,
    F_R16,
    F_R64,
    F_GAP,
    F_RATE,
    F_PRIOR,
    F_TRANS,
    F_HINT,
) = range(11)
NUM_FEATURES = 11
F_CUM = NUM_FEATURES  # the bucket's own feature, stored as the rate it derives from
STATE_VERSION = 1
# sum_{h=1}^{32} P(D > h) from P(D > H) at the buckets: trapezoids between them
_TRAP = np.zeros(NB)
_TRAP[0] += 1.0
for _i in range(NB - 1):
    _w = float(HORIZONS[_i + 1] - HORIZONS[_i])
    _TRAP[_i] += _w / 2
    _TRAP[_i + 1] += _w / 2


def _top_k_of(config: dict | None) -> int | None:
    if not config:
        return None
    try:
        from engine.store.families import moe_layout

        return moe_layout(dict(config)).top_k or None
    except (KeyError, ValueError, TypeError):
        return None


def _clip(x, lo: float, hi: float) -> np.ndarray:
    """``np.clip(x, lo, hi)`` (the same values, NaN kept) without its Python-level dispatch."""
    return np.minimum(np.maximum(x, lo), hi)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = _clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-_clip(z, -30.0, 30.0)))


if hasattr(np, "bitwise_count"):

    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x).astype(np.float32)

else:  # numpy < 2.0
    _BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(*x.shape, 8)
        return _BYTE_BITS[b].sum(axis=-1).astype(np.float32)


_MASKS = {n: np.uint64((1 << n) - 1) for n in (2, 4, 16, 32)}
_MASKS[64] = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOGH = np.log2(HORIZONS.astype(np.float64))
_H_MASKS = np.array([(1 << int(h)) - 1 for h in HORIZONS], dtype=np.uint64)


def initial_weights() -> np.ndarray:
    """Starting weights [NB, NUM_FEATURES + 1]: the frequency term alone (``1 - (1 - r)^H``)."""
    w = np.zeros((NB, NUM_FEATURES + 1))
    w[:, F_CUM] = 1.0
    w[:, F_TRANS] = 2.0
    w[:, F_HINT] = 6.0
    return w


class EAMPolicy(Policy):
    """Trace-driven prefetch and replacement (see the module docstring)."""

    name = "eam"

    def __init__(
        self,
        model_name: str | None = None,
        collection: EAMCollection | None = None,
        learn: bool = True,
        weights: np.ndarray | None = None,
        learning_rate: float = 0.1,
        hint_weight: float = 6.0,
        prefetch_floor: float = 0.7,
        prefetch_layers: int = 1,
        transition_trust: float = 32.0,
        horizon: int = 1,
        prior_weight: float = 8.0,
        persist: bool = True,
        criterion: str = "horizon",
        horizon_scale: float = 1.0,
        top_k: int | None = None,
        config: dict | None = None,
    ):
        self.model_name = model_name
        self._given = collection
        self._given_weights = None if weights is None else np.array(weights, dtype=np.float64)
        self.learn = learn
        self.learning_rate = learning_rate
        self.hint_weight = hint_weight
        self.prefetch_floor = prefetch_floor
        self.prefetch_layers = prefetch_layers
        self.transition_trust = transition_trust
        self.horizon = horizon
        self.prior_weight = prior_weight
        self.persist = persist
        self.criterion = criterion
        self.horizon_scale = horizon_scale
        self._top_k_given = top_k or _top_k_of(config)

    # -- lifecycle ----------------------------------------------------------------------------------
    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        L, E = num_layers, num_experts
        coll = self._given
        store = None
        if self.model_name and (coll is None or self._given_weights is None):
            from engine.trace.store import TraceStore

            try:
                store = TraceStore(self.model_name)
            except Exception:  # an odd name: no persisted state, the policy still works
                store = None
        if coll is None and store is not None:
            coll = store.load_collection(num_layers, num_experts)
        if coll is None or (coll.num_layers, coll.num_experts) != (L, E):
            coll = EAMCollection(L, E)
        self.collection = coll
        self._store = store if self.persist else None
        w = self._given_weights
        if w is None and store is not None:
            w = self._read_state(store)
        if w is None or w.shape != (NB, NUM_FEATURES + 1):
            w = initial_weights()
            w[:, F_HINT] = self.hint_weight
        self.weights = w.copy()
        self.updates = 0  # gradient steps taken (per bucket)
        self.resident = np.zeros((L, E), dtype=bool)
        self.top_k = self._top_k_given or 1
        self._session_counts = np.zeros((L, E), dtype=np.float32)
        self._session_tokens = 0
        self._grid = np.indices((L, E))  # [2, L, E]: each expert's (layer, expert), for gathers
        self._hint = np.zeros((L, E), dtype=np.float32)
        self._has_hint = np.zeros(L, dtype=bool)
        self._cur = EAM.empty(L, E)
        self._reset_request()

    def state_key(self) -> str:
        return f"eam-v{STATE_VERSION}-f{NUM_FEATURES}-h{','.join(map(str, HORIZONS))}"

    def _read_state(self, store) -> np.ndarray | None:
        try:
            state = store.read_policy_state(self.name)
        except Exception:  # unreadable: start afresh (the store warns)
            return None
        if not state or str(state.get("key", "")) != self.state_key():
            return None
        w = np.asarray(state.get("weights"), dtype=np.float64)
        return w if w.shape == (NB, NUM_FEATURES + 1) and np.all(np.isfinite(w)) else None

    def save_state(self) -> None:
        """Persist the learned weights beside the model's traces (when the policy has a model name)."""
        if self._store is None or not self.learn or self.updates == 0:
            return
        try:
            self._store.write_policy_state(
                self.name, {"key": np.array(self.state_key()), "weights": self.weights}
            )
        except OSError:
            pass  # a read-only home: the weights live on in memory

    def _reset_request(self) -> None:
        L, E = self.num_layers, self.num_experts
        self._dist: np.ndarray | None = None
        self._score: np.ndarray | None = None
        self._horizon_runs: float | None = None
        self._stale: set[int] = set()  # layers whose predictions wait for their features (``_predict``)
        self._hist = np.zeros((L, E), dtype=np.uint64)  # bit i: used at the layer's run i runs ago
        self._runs = np.zeros(L, dtype=np.int64)  # runs of each layer in this request
        self._tok = np.zeros(L, dtype=np.float64)  # tokens through each layer in this request
        self._req_counts = np.zeros((L, E), dtype=np.float32)
        self._cur = EAM.empty(L, E)
        self._tokens = 0
        self._new_step = True
        self._layer = -1
        self._token_experts: dict[int, np.ndarray] = {}
        self._prior = np.full((L, E), self.top_k / E, dtype=np.float32)
        self._trans = np.full((L, E), np.nan, dtype=np.float32)  # transition prediction, this token
        self._feat = np.zeros((L, E, NUM_FEATURES + 1), dtype=np.float32)
        self._ring = np.zeros((L, RING, E, NUM_FEATURES + 1), dtype=np.float32)
        self._cum = np.zeros((L, E, NB), dtype=np.float64)  # predicted F_H
        self._exp_runs = np.ones((L, E), dtype=np.float64)  # expected runs to the next use
        self._tail_q = np.full((L, E), 1e-3)  # per-run use chance beyond the last bucket
        self._refresh_prior()
        for layer in range(L):
            self._features(layer)
            self._ring[layer, 0] = self._feat[layer]

    def begin_sequence(self) -> None:
        if self.learn and self._cur.tokens.sum() > 0:
            self.collection.add(self._cur)
            self.save_state()
        self._reset_request()

    def end_sequence(self) -> None:
        self.save_state()

    def begin_token(self) -> None:
        self._new_step = True
        self._dist = None
        self._score = None
        self._horizon_runs = None
        self._token_experts = {}
        self._layer = -1
        if np.isfinite(self._trans).any():
            stale = np.nonzero(np.isfinite(self._trans).any(axis=1))[0]
            self._trans[:] = np.nan
            for layer in stale:
                self._feat[layer, :, F_TRANS] = 0.0
                self._predict(int(layer))
        if self._tokens and self._tokens % 4 == 0:
            self._refresh_prior()

    # -- features and prediction ----------------------------------------------------------------------
    def _rate(self, layer: int) -> np.ndarray:
        """The request's use rate of each expert of ``layer`` so far, shrunk towards the prior."""
        m = self.prior_weight
        return (self._req_counts[layer] + m * self._prior[layer]) / (self._tok[layer] + m)

    def _features(self, layer: int) -> None:
        """The feature rows of ``layer``'s experts for its next run (from the history so far)."""
        h = self._hist[layer]
        n = int(self._runs[layer])
        f = self._feat[layer]
        f[:, F_BIAS] = 1.0
        f[:, F_PREV] = (h & np.uint64(1)).astype(np.float32)
        f[:, F_PREV2] = ((h >> np.uint64(1)) & np.uint64(1)).astype(np.float32)
        prior = self._prior[layer]
        for col, w in ((F_R4, 4), (F_R16, 16), (F_R64, 64)):
            seen = min(n, w)
            c = _popcount(h & _MASKS[w])
            f[:, col] = (c + prior) / (seen + 1.0)  # one pseudo-run of the prior
        low = h & (~h + np.uint64(1))  # lowest set bit: the last use
        gap = np.where(h != 0, np.log2(np.maximum(low, np.uint64(1)).astype(np.float64)) + 1.0, min(n, WINDOW) + 1.0)
        f[:, F_GAP] = np.log2(gap) / 6.0
        rate = self._rate(layer)
        f[:, F_RATE] = _logit(rate) / 4.0
        f[:, F_PRIOR] = _logit(prior) / 4.0
        t = self._trans[layer]
        f[:, F_TRANS] = np.where(np.isfinite(t), t - prior, 0.0)
        f[:, F_HINT] = 0.0
        f[:, F_CUM] = rate
        self._predict(layer)

    def _design(self, f: np.ndarray) -> np.ndarray:
        """[..., NB, NUM_FEATURES + 1]: the common features with each bucket's own one in F_CUM."""
        x = np.repeat(f[..., None, :], NB, axis=-2).astype(np.float64)
        r = _clip(f[..., F_CUM].astype(np.float64), 1e-6, 1 - 1e-6)
        x[..., F_CUM] = _logit(1.0 - (1.0 - r[..., None]) ** HORIZONS)
        return x

    def _predict(self, layer: int) -> None:
        """``layer``'s feature rows changed: its predictions are made again when next read (``_fresh``),
        once however many times the rows changed meanwhile (the routing, the transitions, a hint)."""
        self._stale.add(layer)
        self._dist = None
        self._score = None

    def _fresh(self) -> None:
        """Bring the predictions of every layer whose features changed up to date (before any read of
        them, and before the weights change, so each is what predicting at once would have given)."""
        if self._stale:
            for layer in sorted(self._stale):
                self._compute(layer)
            self._stale.clear()

    def _compute(self, layer: int) -> None:
        x = self._design(self._feat[layer])  # [E, NB, F]
        z = np.einsum("ebf,bf->eb", x, self.weights)
        cum = np.maximum.accumulate(_sigmoid(z), axis=-1)
        self._cum[layer] = cum
        surv = _clip(1.0 - cum, 1e-6, 1.0)
        q = 1.0 - (surv[:, -1] / surv[:, -2]) ** (1.0 / (HORIZONS[-1] - HORIZONS[-2]))
        q = _clip(q, 1e-3, 1.0)
        tail = surv[:, -1] * (1.0 - q) / q
        self._exp_runs[layer] = 1.0 + surv @ _TRAP + tail
        self._tail_q[layer] = q
        self._dist = None
        self._score = None

    def _learn(self, layer: int) -> None:
        """One gradient step of every bucket model: the features of ``H`` runs ago, labelled by
        whether the expert was used in the ``H`` runs since."""
        n = int(self._runs[layer])  # runs so far, this one included
        ok = HORIZONS <= n
        if not ok.any():
            return
        hs = HORIZONS[ok]
        slots = (n - hs) % RING
        f = self._ring[layer, slots]  # [b, E, F]
        b_idx = np.nonzero(ok)[0]
        x = f.astype(np.float64)  # [b, E, F]: bucket b's design (``_design``, its own bucket only)
        r = _clip(f[..., F_CUM].astype(np.float64), 1e-6, 1 - 1e-6)
        x[..., F_CUM] = _logit(1.0 - (1.0 - r) ** hs[:, None])
        y = ((self._hist[layer][None, :] & _H_MASKS[ok][:, None]) != 0).astype(np.float64)
        p = _sigmoid(np.einsum("bef,bf->be", x, self.weights[b_idx]))
        grad = np.einsum("be,bef->bf", y - p, x) / x.shape[1]
        self._fresh()  # what was predicted with the weights before this step
        self.weights[b_idx] += self.learning_rate * grad
        self.updates += 1

    # -- observations ---------------------------------------------------------------------------------
    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        self._dist = None
        self._score = None
        ids = np.fromiter((int(e) for e in experts), dtype=np.int64)
        cnt = np.ones(len(ids), dtype=np.float32) if counts is None else np.asarray(counts, dtype=np.float32)
        multi = bool(len(cnt) and cnt.max() > 1)
        if not multi:
            self.top_k = max(self.top_k, len(ids))
        self._layer = layer
        step_tokens = max(1.0, float(cnt.sum()) / self.top_k) if multi else 1.0
        phase = PREFILL if multi else DECODE
        self._ring[layer, int(self._runs[layer]) % RING] = self._feat[layer]  # as predicted (hints too)
        if self._new_step:  # the first MoE layer of a step: count its tokens once
            self._new_step = False
            self._tokens += 1
            self._cur.tokens[phase] += int(round(step_tokens))
            self._session_tokens += int(round(step_tokens))
        self._cur.counts[phase, layer, ids] += cnt
        self._session_counts[layer, ids] += cnt

        share = np.zeros(self.num_experts, dtype=np.float32)  # fraction of the step's tokens per expert
        share[ids] = np.minimum(cnt / step_tokens, 1.0) if multi else 1.0
        used = np.zeros(self.num_experts, dtype=np.uint64)
        used[ids] = 1
        self._hist[layer] = (self._hist[layer] << np.uint64(1)) | used
        self._runs[layer] += 1
        self._tok[layer] += step_tokens
        self._req_counts[layer] += share * step_tokens
        if not multi and self.learn:
            self._learn(layer)
        self._trans[layer] = np.nan
        self._has_hint[layer] = False
        self._features(layer)
        self._ring[layer, int(self._runs[layer]) % RING] = self._feat[layer]
        if not multi:
            prev = self._token_experts.get(layer - 1)
            if self.learn and prev is not None and self.collection.transitions is not None and len(ids):
                self.collection.transitions[layer - 1][np.ix_(prev, ids)] += 1.0
            self._token_experts[layer] = ids
            self._predict_next_layer(layer, ids)

    def on_hint(self, layer: int, scores: Sequence[float]) -> None:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != self.num_experts or not 0 <= layer < self.num_layers:
            return
        p = np.exp(s - s.max())
        p = np.minimum(p / p.sum() * self.top_k, 1.0)
        self._hint[layer] = p
        self._has_hint[layer] = True
        self._feat[layer, :, F_HINT] = p - self._prior[layer]
        self._predict(layer)

    def on_load(self, key: Key) -> None:
        self.resident[key] = True

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

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
            self._prior = np.clip(pred, 1e-4, 1.0).astype(np.float32)

    def _predict_next_layer(self, layer: int, ids: np.ndarray) -> None:
        """Transition-based probabilities for this token's coming layers (feature F_TRANS).

        Layer+1 from this token's experts at ``layer``; further layers (up to ``horizon``) by chaining
        the prediction through the next transition matrices, which flattens it as it goes.
        """
        tr = self.collection.transitions
        if tr is None or not len(ids):
            return
        cur = np.zeros(self.num_experts, dtype=np.float64)
        cur[ids] = 1.0
        for nl in range(layer + 1, min(layer + 1 + self.horizon, self.num_layers)):
            rows = cur @ tr[nl - 1]
            total = float(rows.sum())
            if total <= 0:
                return
            n_obs = total / max(float(cur.sum()), 1e-6) / max(self.top_k, 1)  # tokens behind these rows
            a = n_obs / (n_obs + self.transition_trust)
            pred = np.minimum(rows * (self.top_k / total), 1.0)
            self._trans[nl] = a * pred + (1 - a) * self._prior[nl]
            self._feat[nl, :, F_TRANS] = self._trans[nl] - self._prior[nl]
            self._predict(nl)
            cur = pred

    def probabilities(self) -> np.ndarray:
        """P(used at the layer's next run) [L, E] for every expert."""
        self._fresh()
        return self._cum[..., 0].astype(np.float32)

    def long_run_rates(self) -> np.ndarray:
        """Per-token usage rate [L, E] of this request so far, shrunk towards the prior."""
        m = self.prior_weight
        return (self._req_counts + m * self._prior) / (self._tok[:, None] + m)

    def next_use_distance(self) -> np.ndarray:
        """Expected steps [L, E] until each expert is next needed (layer steps; larger = later)."""
        self._fresh()
        if self._dist is not None:
            return self._dist
        L = self.num_layers
        d0 = (np.arange(L) - self._layer) % L
        d0[d0 == 0] = L
        self._dist = d0.astype(np.float64)[:, None] + L * (self._exp_runs - 1.0)
        return self._dist

    def use_within(self, runs: np.ndarray) -> np.ndarray:
        """P(used within the next ``runs`` runs of its layer) [L, E]; ``runs`` [L, 1] or [L, E] (float).

        Interpolated between the buckets in log2(runs), linear from 0 below one run, and beyond the
        last bucket extended at the per-run rate the last two buckets imply."""
        self._fresh()
        n = np.broadcast_to(np.asarray(runs, dtype=np.float64), self._cum.shape[:2])
        cum = self._cum
        logh = _LOGH
        x = np.log2(_clip(n, 1.0, float(HORIZONS[-1])))
        j = _clip(np.searchsorted(logh, x, side="right") - 1, 0, NB - 2)
        frac = _clip((x - logh[j]) / (logh[j + 1] - logh[j]), 0.0, 1.0)
        rows, cols = self._grid
        lo = cum[rows, cols, j]
        hi = cum[rows, cols, j + 1]
        inside = lo + frac * (hi - lo)
        beyond = 1.0 - (1.0 - cum[..., -1]) * (1.0 - self._tail_q) ** np.maximum(n - HORIZONS[-1], 0.0)
        out = np.where(n > HORIZONS[-1], beyond, inside)
        return np.where(n < 1.0, cum[..., 0] * _clip(n, 0.0, 1.0), out)

    def horizon_runs(self) -> float:
        """The cache's characteristic time in runs (Che's approximation): the horizon within which
        the experts expected to be used number the capacity, times ``horizon_scale``."""
        if self._horizon_runs is None:
            grid = 2.0 ** np.arange(0.0, 8.01, 0.25)
            target = float(self.capacity)
            used: list[float] = []
            for g in grid:  # expected experts used within g runs: grows with g; stop once past the capacity
                used.append(float(self.use_within(np.full((self.num_layers, 1), g)).sum()))
                if used[-1] >= target:
                    break
            i = len(used) - 1 if used[-1] >= target else len(grid)
            if i == 0:
                h = grid[0]
            elif i >= len(grid):
                h = grid[-1]
            else:
                a, b = used[i - 1], used[i]
                h = grid[i - 1] * (grid[i] / grid[i - 1]) ** ((target - a) / max(b - a, 1e-9))
            self._horizon_runs = float(h) * self.horizon_scale
        return self._horizon_runs

    def keep_score(self) -> np.ndarray:
        """[L, E], larger = keep: P(next use within the cache's horizon), ties by nearer expected use."""
        if self._score is not None:
            return self._score
        dist = self.next_use_distance()
        if self.criterion == "distance":
            self._score = -dist
            return self._score
        L = self.num_layers
        d0 = (np.arange(L) - self._layer) % L
        d0[d0 == 0] = L
        steps = self.horizon_runs() * L
        runs = (steps - d0[:, None]) / L + 1.0
        self._score = self.use_within(np.maximum(runs, 0.0)) - 1e-9 * dist
        return self._score

    # -- decisions ----------------------------------------------------------------------------------
    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        score = self.keep_score()
        if len(resident) != int(self.resident.sum()):
            self._resync(resident)
        for _ in range(2):
            mask = self.resident.copy()
            for key in pinned:
                mask[key] = False
            if mask.any():
                flat = int(np.argmin(np.where(mask, score, np.inf)))
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
        layers += [nl for nl in range(layer + 1, L) if self._has_hint[nl]]  # hinted further ahead
        self._fresh()
        layers = list(dict.fromkeys(layers))
        p = self._cum[layers, :, 0].astype(np.float32)  # ``probabilities()`` of these layers
        found = np.nonzero((p >= self.prefetch_floor) & ~self.resident[layers])
        if not len(found[0]):
            return []
        dist = self.next_use_distance()
        cands: list[tuple[float, Key]] = []
        for i, e in zip(found[0].tolist(), found[1].tolist(), strict=True):
            nl = layers[i]
            cands.append((float(dist[nl, e]), (nl, e)))
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
