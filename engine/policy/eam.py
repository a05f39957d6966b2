"""The trace-driven policy ``eam`` (the default): predict each expert's next use, prefetch, evict.

For every expert (l, e) the policy estimates ``p[l, e]``, the probability that e is used the next
time layer l runs, with a small logistic model over features that combine the sources the papers
use, and learns the model's weights online (every single-token step is a labelled example: the
features an expert had before its layer ran, and whether the router picked it):

* recency and frequency inside the running request: used at the layer's previous run, the run
  before, a fast and a slow exponential moving average of use, the request's usage rate;
* the EAM collection: the usage rate that past requests like this one predict
  (``EAMCollection.predict``: cosine match of the partial EAM over the layers seen so far, nearer
  layers weighted more), or the session's rate while the collection is empty;
* cross-layer transitions: for the layers still to come in the current token, the experts that
  tokens routed like this one used at the next layer (transition counts of the collection);
* speculative-gating hints (``on_hint(layer, scores)``: the coming layer's router applied early to
  the current hidden state); the hint's excess over the prior is a feature whose weight starts high.

Eviction approximates Belady: the expected next-use distance of (l, e) in layer steps is the
distance to layer l's next run plus ``L * (1 - p) / q``: if the next run does not use it, a
geometric number of further tokens at the per-token rate ``q``. ``q`` mixes the short-term ``p``
with a long-run rate (the request's usage rate shrunk towards the EAM prior and the session's rate);
the mixing share is itself learned online, as the mixture that best predicted (log loss) the use two
runs after the prediction was made. ``victim`` evicts the resident expert whose expected next use is
farthest. ``prefetch`` proposes the
most likely non-resident experts of the next layers whose probability clears ``prefetch_floor``
and whose expected use comes before that of the resident expert each would displace.

Learning across requests: at each ``begin_sequence`` the finished request's EAM joins the in-memory
collection and every single-token step adds to the transition counts. With ``model_name`` the
persisted collection of that model (``$MOEINF_HOME/traces/<model>/``) is loaded at ``setup``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.policy.base import Key, Policy
from engine.trace.eam import DECODE, EAM, PREFILL, EAMCollection

# feature order of the reuse model
F_BIAS, F_PREV, F_PREV2, F_FAST, F_SLOW, F_FREQ, F_PRIOR, F_TRANS, F_HINT = range(9)
NUM_FEATURES = 9


def _top_k_of(config: dict | None) -> int | None:
    if not config:
        return None
    try:
        from engine.store.families import moe_layout

        return moe_layout(dict(config)).top_k or None
    except (KeyError, ValueError, TypeError):
        return None


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


class EAMPolicy(Policy):
    """Trace-driven prefetch and replacement (see the module docstring)."""

    name = "eam"

    def __init__(
        self,
        model_name: str | None = None,
        collection: EAMCollection | None = None,
        learn: bool = True,
        fast_decay: float = 0.5,
        slow_decay: float = 0.95,
        learning_rate: float = 0.05,
        hint_weight: float = 6.0,
        prefetch_floor: float = 0.7,
        prefetch_layers: int = 1,
        transition_trust: float = 32.0,
        horizon: int = 1,
        long_run_weight: float = 8.0,
        short_term_share: float = 0.5,
        share_rate: float = 0.01,
        top_k: int | None = None,
        config: dict | None = None,
    ):
        self.model_name = model_name
        self._given = collection
        self.learn = learn
        self.fast_decay, self.slow_decay = fast_decay, slow_decay
        self.learning_rate = learning_rate
        self.hint_weight = hint_weight
        self.prefetch_floor = prefetch_floor
        self.prefetch_layers = prefetch_layers
        self.transition_trust = transition_trust
        self.horizon = horizon
        self.long_run_weight = long_run_weight
        self.short_term_share = short_term_share
        self.share_rate = share_rate
        self._top_k_given = top_k or _top_k_of(config)

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
        self.top_k = self._top_k_given or 1
        self._session_counts = np.zeros((L, E), dtype=np.float32)
        self._session_tokens = 0
        self.weights = np.zeros(NUM_FEATURES, dtype=np.float64)
        self._weights_ready = False
        self.short_share = self.short_term_share
        self._hint = np.zeros((L, E), dtype=np.float32)
        self._has_hint = np.zeros(L, dtype=bool)
        self._cur = EAM.empty(L, E)
        self._reset_request()

    def _init_weights(self) -> None:
        base = self.top_k / self.num_experts
        w = np.zeros(NUM_FEATURES)
        w[F_BIAS] = float(_logit(base)) - 1.0
        w[F_PREV], w[F_FAST], w[F_SLOW], w[F_FREQ] = 0.5, 1.0, 1.0, 1.0
        w[F_PRIOR], w[F_TRANS] = 2.0, 2.0
        w[F_HINT] = self.hint_weight
        self.weights = w
        self._weights_ready = True

    def _reset_request(self) -> None:
        L, E = self.num_layers, self.num_experts
        self._dist: np.ndarray | None = None
        self._feat = np.zeros((L, E, NUM_FEATURES), dtype=np.float32)
        self._feat[..., F_BIAS] = 1.0
        self._runs = np.zeros(L, dtype=np.float64)  # single-token runs of each layer in this request
        self._req_counts = np.zeros((L, E), dtype=np.float32)
        self._cur = EAM.empty(L, E)
        self._tokens = 0
        self._new_step = True
        self._layer = -1
        self._token_experts: dict[int, np.ndarray] = {}
        self._prior = np.full((L, E), self.top_k / E, dtype=np.float32)
        self._hist = np.full((2, 2, L, E), np.nan, dtype=np.float64)  # [age, (short, long), L, E]
        self._refresh_prior()

    def begin_sequence(self) -> None:
        if self.learn and self._cur.tokens.sum() > 0:
            self.collection.add(self._cur)
        self._reset_request()

    def begin_token(self) -> None:
        self._new_step = True
        self._dist = None
        self._token_experts = {}
        self._layer = -1
        if self._tokens and self._tokens % 4 == 0:
            self._refresh_prior()

    # -- observations ---------------------------------------------------------------------------------
    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        self._dist = None
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
        f = self._feat[layer]
        if not multi and self.learn and self._weights_ready:
            self._learn(f, used)
            self._learn_share(layer, used)
        # features for this layer's next run
        self._runs[layer] += step_tokens
        self._req_counts[layer] += share * step_tokens
        f[:, F_PREV2] = f[:, F_PREV]
        f[:, F_PREV] = used
        df, ds = self.fast_decay**step_tokens, self.slow_decay**step_tokens
        f[:, F_FAST] = f[:, F_FAST] * df + (1 - df) * share
        f[:, F_SLOW] = f[:, F_SLOW] * ds + (1 - ds) * share
        f[:, F_FREQ] = self._req_counts[layer] / max(self._runs[layer], 1)
        f[:, F_PRIOR] = self._prior[layer]
        f[:, F_TRANS] = self._prior[layer]
        f[:, F_HINT] = 0.0
        self._has_hint[layer] = False
        if not multi:
            prev = self._token_experts.get(layer - 1)
            if self.learn and prev is not None and self.collection.transitions is not None and len(ids):
                self.collection.transitions[layer - 1][np.ix_(prev, ids)] += 1.0
            self._token_experts[layer] = ids
            self._predict_next_layer(layer, ids)
        if self._weights_ready:  # this run's predictions, judged two runs from now
            self._hist[1, :, layer] = self._hist[0, :, layer]
            z = self._feat[layer].astype(np.float64) @ self.weights
            self._hist[0, 0, layer] = 1.0 / (1.0 + np.exp(-z))
            self._hist[0, 1, layer] = self.long_run_rates()[layer]

    def _learn(self, f: np.ndarray, used: np.ndarray) -> None:
        """One SGD step of the logistic reuse model on this layer's run (features were set before it)."""
        z = f.astype(np.float64) @ self.weights
        p = 1.0 / (1.0 + np.exp(-z))
        grad = (used - p) @ f / max(len(used), 1)
        self.weights += self.learning_rate * grad * len(used) / max(self.top_k, 1)

    def _learn_share(self, layer: int, used: np.ndarray) -> None:
        """One SGD step on the share of the short-term probability in the beyond-next-run rate: the
        mixture of the predictions made two runs ago that best predicts this run (log loss)."""
        short, long = self._hist[1, 0, layer], self._hist[1, 1, layer]
        if np.isnan(short).any() or np.isnan(long).any():
            return
        lam = self.short_share
        m = np.clip(lam * short + (1.0 - lam) * long, 1e-4, 1 - 1e-4)
        grad = float(np.mean(-(used / m - (1.0 - used) / (1.0 - m)) * (short - long)))
        self.short_share = float(np.clip(lam - self.share_rate * grad, 0.05, 0.95))

    def on_hint(self, layer: int, scores: Sequence[float]) -> None:
        self._dist = None
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.shape[0] != self.num_experts or not 0 <= layer < self.num_layers:
            return
        p = np.exp(s - s.max())
        p = np.minimum(p / p.sum() * self.top_k, 1.0)
        self._hint[layer] = p
        self._has_hint[layer] = True
        self._feat[layer, :, F_HINT] = p - self._feat[layer, :, F_PRIOR]

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
            if hasattr(self, "_feat"):
                self._feat[..., F_PRIOR] = self._prior

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
            self._feat[nl, :, F_TRANS] = a * pred + (1 - a) * self._prior[nl]
            cur = pred

    def probabilities(self) -> np.ndarray:
        """P(used at the layer's next run) [L, E] for every expert."""
        if not self._weights_ready:
            return np.maximum(self._prior, self._feat[..., F_FAST])
        z = self._feat.astype(np.float64) @ self.weights
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def long_run_rates(self) -> np.ndarray:
        """Per-token usage rate [L, E] after the next run: request counts shrunk towards the prior and
        the session's rate (``long_run_weight`` pseudo-tokens of them)."""
        m = self.long_run_weight
        session = (self._session_counts + self._prior) / (self._session_tokens + 1.0)
        base = 0.5 * self._prior + 0.5 * session
        return (self._req_counts + m * base) / (self._runs[:, None] + m)

    def next_use_distance(self) -> np.ndarray:
        """Expected steps [L, E] until each expert is next needed (layer steps; larger = later)."""
        if self._dist is not None:
            return self._dist
        L = self.num_layers
        p = np.clip(self.probabilities(), 1e-4, 1.0)
        d0 = (np.arange(L) - self._layer) % L
        d0[d0 == 0] = L
        lam = self.short_share
        p_long = np.clip(lam * p + (1.0 - lam) * self.long_run_rates(), 1e-4, 1.0)
        self._dist = d0.astype(np.float64)[:, None] + L * (1.0 - p) / p_long
        return self._dist

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
        layers += [nl for nl in range(layer + 1, L) if self._has_hint[nl]]  # hinted further ahead
        p = self.probabilities()
        dist = self.next_use_distance()
        cands: list[tuple[float, Key]] = []
        for nl in dict.fromkeys(layers):
            for e in np.nonzero((p[nl] >= self.prefetch_floor) & ~self.resident[nl])[0]:
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
