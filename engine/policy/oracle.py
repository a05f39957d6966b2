"""The token oracle: how close to Belady any causal cache policy can hope to get on a trace.

Belady's optimum knows the whole future. A live policy cannot: in decode, the routing of token t+1
does not exist before token t is finished (it depends on the token t produces). The most a predictor
can know when it evicts at step (t, l) is therefore the routing of the *rest of token t* (what a
perfect speculative-gating predictor would say) plus statistics of the request.

``TokenOraclePolicy`` is given exactly that, taken from the trace itself (so more than any real
predictor has):

* the exact experts of every remaining layer of the current token;
* for every expert, its exact per-token use rate over its sequence, and its exact reuse rates
  P(used at the next token | used at this one) and P(used at the next token | not used at this one)
  over the whole trace (temporal correlation);

and evicts like Belady with that knowledge: an expert the rest of the token needs is kept by the
distance to that use; every other one by its expected next-use distance (the distance to its
layer's run in the next token, plus ``L * (1 - p1) / p`` layer steps: if the next token does not use
it, a geometric number of further tokens at its long-run rate ``p``).

With ``lookahead=W`` the oracle is told every use within the next W layer steps instead, across token
boundaries (impossible in decode; it shows how much clairvoyance beyond the token would buy).

``token_oracle_loads(trace, capacity)`` is its demand-paging loads through the ordinary replay.
It is not a proof of a lower bound (a policy could be luckier on some trace), but a reference with
strictly more knowledge than any causal predictor: when it stays far above Belady, a goal stated
relative to Belady is out of reach for every online policy on that trace.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.policy.base import Key, Policy
from engine.trace.format import RoutingTrace


def used_matrix(trace: RoutingTrace) -> np.ndarray:
    """Bool [T, L, E]: whether token t used expert e at layer l."""
    ids = trace.expert_ids
    T, L, k = ids.shape
    used = np.zeros((T, L, trace.num_experts), dtype=bool)
    t_idx, l_idx = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
    for j in range(k):
        valid = ids[:, :, j] >= 0
        used[t_idx[valid], l_idx[valid], ids[:, :, j][valid]] = True
    return used


class TokenOraclePolicy(Policy):
    """Evicts with the rest of the current token known exactly and exact per-expert rates (see above)."""

    name = "token-oracle"

    def __init__(self, trace: RoutingTrace, lookahead: int | None = None):
        self.used = used_matrix(trace)
        self.lookahead = lookahead
        T = self.used.shape[0]
        # next_tok[t, l, e]: the first token >= t that uses (l, e) (T: none)
        self.next_tok = np.full((T + 1, *self.used.shape[1:]), T, dtype=np.int32)
        for t in range(T - 1, -1, -1):
            self.next_tok[t] = np.where(self.used[t], t, self.next_tok[t + 1])
        spans = trace.sequences()
        self.seq_of = np.zeros(max(T, 1), dtype=np.int64)  # token -> its sequence
        rates = []  # [S][L, E]: each sequence's use rate
        for i, (s, e) in enumerate(spans):
            self.seq_of[s:e] = i
            rates.append(self.used[s:e].mean(axis=0) if e > s else np.zeros(self.used.shape[1:]))
        self.rate = np.maximum(
            np.stack(rates) if rates else np.zeros((1, *self.used.shape[1:])), 1.0 / max(T, 1)
        )
        before, after = self.used[:-1], self.used[1:]
        n1 = before.sum(axis=0)
        n0 = (~before).sum(axis=0)
        self.p11 = np.where(n1 > 0, (before & after).sum(axis=0) / np.maximum(n1, 1), 0.0)
        self.p01 = np.where(n0 > 0, (~before & after).sum(axis=0) / np.maximum(n0, 1), 0.0)

    def setup(self, num_layers: int, num_experts: int, capacity: int) -> None:
        super().setup(num_layers, num_experts, capacity)
        self.t = -1
        self.layer = 0
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)

    def begin_token(self) -> None:
        self.t += 1
        self.layer = 0

    def on_route(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> None:
        self.layer = layer

    def on_load(self, key: Key) -> None:
        self.resident[key] = True

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

    def next_use_distance(self) -> np.ndarray:
        """Distance [L, E] in layer steps to each expert's next use: exact within the window (the rest
        of the token, or ``lookahead`` steps), else expected and at least the window."""
        L, T = self.num_layers, self.used.shape[0]
        t, cur = min(self.t, T - 1), self.layer
        ahead = np.arange(L)[:, None] - cur  # > 0 for the layers still to run in this token
        tok = np.where(ahead > 0, self.next_tok[t], self.next_tok[t + 1])
        exact = (tok - t) * L + ahead
        window = L - cur if self.lookahead is None else self.lookahead
        p1 = np.maximum(np.where(self.used[t], self.p11, self.p01), 1e-6)
        expected = np.maximum(L + ahead + L * (1.0 - p1) / self.rate[self.seq_of[t]], window)
        return np.where(exact < window, exact, expected)

    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        mask = np.zeros_like(self.resident)
        for key in resident:
            mask[key] = True
        for key in pinned:
            mask[key] = False
        flat = int(np.argmax(np.where(mask, self.next_use_distance(), -np.inf)))
        return (flat // self.num_experts, flat % self.num_experts)


def token_oracle_loads(trace: RoutingTrace, capacity: int, lookahead: int | None = None) -> int:
    """Loads of ``TokenOraclePolicy`` (demand paging) on ``trace`` with a cache of ``capacity``."""
    from engine.policy.replay import replay

    return replay(trace, TokenOraclePolicy(trace, lookahead), capacity, with_belady=False).loads
