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

``token_oracle_loads(trace, capacity)`` is its demand-paging loads through the ordinary replay.
It is not a proof of a lower bound (a policy could be luckier on some trace), but a reference with
strictly more knowledge than any causal predictor: when it stays far above Belady, a goal stated
relative to Belady is out of reach for every online policy on that trace.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from engine.memory.policy import Key, Policy
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

    def __init__(self, trace: RoutingTrace):
        self.used = used_matrix(trace)
        T = self.used.shape[0]
        rate = np.zeros(self.used.shape, dtype=np.float64)  # [T, L, E]: the token's sequence rate
        for s, e in trace.sequences():
            rate[s:e] = self.used[s:e].mean(axis=0)
        self.rate = np.maximum(rate, 1.0 / max(T, 1))
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
        """Distance [L, E] in layer steps to each expert's next use: exact within the token, else expected."""
        L = self.num_layers
        t, cur = min(self.t, self.used.shape[0] - 1), self.layer
        now = self.used[t]
        ahead = np.arange(L)[:, None] - cur  # > 0 for the layers still to run in this token
        p1 = np.maximum(np.where(now, self.p11, self.p01), 1e-6)
        expected = L + ahead + L * (1.0 - p1) / self.rate[t]
        return np.where(now & (ahead > 0), ahead, expected)

    def victim(self, resident: Collection[Key], pinned: Collection[Key]) -> Key:
        mask = np.zeros_like(self.resident)
        for key in resident:
            mask[key] = True
        for key in pinned:
            mask[key] = False
        flat = int(np.argmax(np.where(mask, self.next_use_distance(), -np.inf)))
        return (flat // self.num_experts, flat % self.num_experts)


def token_oracle_loads(trace: RoutingTrace, capacity: int) -> int:
    """Loads of ``TokenOraclePolicy`` (demand paging) on ``trace`` with a cache of ``capacity``."""
    from engine.trace.replay import replay

    return replay(trace, TokenOraclePolicy(trace), capacity, with_belady=False).loads
