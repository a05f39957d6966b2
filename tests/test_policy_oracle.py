"""The token oracle: the reference for how close to Belady a causal policy can get."""

from __future__ import annotations

import numpy as np

from engine.policy.oracle import TokenOraclePolicy, token_oracle_loads, used_matrix
from engine.policy.replay import belady_loads, capacity_for, replay
from engine.trace.format import RoutingTrace


def random_trace(seed: int, T: int = 60, L: int = 6, E: int = 8, k: int = 2) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(E, 0.5), size=L)  # per-layer popularity, like a real router's
    ids = np.stack(
        [
            np.stack([rng.choice(E, size=k, replace=False, p=skew[layer]) for layer in range(L)])
            for _ in range(T)
        ]
    )
    return RoutingTrace(ids, E, np.array([0, T // 2]))


def test_used_matrix_marks_exactly_the_routed_experts():
    ids = np.array([[[0, 2], [1, -1]]])
    used = used_matrix(RoutingTrace(ids, 3))
    assert used.tolist() == [[[True, False, True], [False, True, False]]]


def test_oracle_sits_between_belady_and_history_only_policies():
    for seed in range(4):
        tr = random_trace(seed)
        for frac in (0.25, 0.5):
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            bel, oracle = belady_loads(tr, cap), token_oracle_loads(tr, cap)
            lru = replay(tr, "lru", cap, with_belady=False).loads
            assert bel <= oracle < lru, (seed, frac, bel, oracle, lru)


def test_oracle_keeps_what_the_rest_of_the_token_needs():
    # two layers of 2 experts, capacity 3; token 0 uses (0,0) (1,0); token 1 uses (0,1) then (1,0).
    tr = RoutingTrace(np.array([[[0], [0]], [[1], [0]]]), 2)
    pol = TokenOraclePolicy(tr)
    pol.setup(2, 2, 2)
    pol.begin_token()
    pol.begin_token()  # token 1, at layer 0: (1, 0) is needed later in this token, (0, 0) is not
    pol.on_route(0, [1])
    for key in [(0, 0), (1, 0)]:
        pol.on_load(key)
    assert pol.victim({(0, 0), (1, 0)}, {(0, 1)}) == (0, 0)


def test_oracle_told_the_whole_future_is_belady():
    for seed in range(4):
        tr = random_trace(seed)
        for frac in (0.25, 0.5):
            cap = capacity_for(frac, tr.num_layers, tr.num_experts)
            assert token_oracle_loads(tr, cap, lookahead=10**9) == belady_loads(tr, cap)
