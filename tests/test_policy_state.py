"""The eam policy's learned state persists through the TraceStore and starts the next session."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from engine.errors import MoeinfError
from engine.policy.eam import F_PREV, EAMPolicy, initial_weights
from engine.policy.registry import make_policy
from engine.policy.replay import replay
from engine.trace.format import RoutingTrace
from engine.trace.store import TraceStore

L, E, K = 4, 16, 2


def sticky_trace(seed: int, T: int = 200, stay: float = 0.85) -> RoutingTrace:
    """Routing with strong recency: each token keeps a layer's experts with probability ``stay``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((T, L, K), dtype=np.int64)
    cur = [rng.choice(E, K, replace=False) for _ in range(L)]
    for t in range(T):
        for layer in range(L):
            if rng.random() > stay:
                cur[layer] = rng.choice(E, K, replace=False)
            ids[t, layer] = cur[layer]
    return RoutingTrace(ids, E, np.array([0, T // 2]))


def test_learned_weights_round_trip_and_start_the_next_session():
    tr = sticky_trace(1)
    first = make_policy("eam", model_name="m")
    replay(tr, first, 12, with_belady=False)
    path = TraceStore("m").policy_state_path("eam")
    assert path.is_file(), "end_sequence must save the learned weights"
    learned = first.weights.copy()
    # the routing repeats: the weight on "used at the layer's last run" grows from its start
    assert learned[0, F_PREV] > initial_weights()[0, F_PREV] + 0.5
    second = make_policy("eam", model_name="m")
    second.setup(L, E, 12)
    np.testing.assert_allclose(second.weights, learned)
    # what the second session does is what the stored weights make it do
    test = sticky_trace(2)
    from_store = replay(test, make_policy("eam", model_name="m", learn=False), 12, with_belady=False)
    given = replay(test, EAMPolicy(weights=learned, learn=False, persist=False), 12, with_belady=False)
    fresh = replay(test, EAMPolicy(learn=False, persist=False), 12, with_belady=False)
    assert from_store.loads == given.loads
    assert from_store.loads < fresh.loads, (from_store.loads, fresh.loads)


def test_no_state_written_without_persist_or_learning():
    tr = sticky_trace(3, T=60)
    replay(tr, make_policy("eam", model_name="a", persist=False), 12, with_belady=False)
    replay(tr, make_policy("eam", model_name="b", learn=False), 12, with_belady=False)
    assert not TraceStore("a").policy_state_path("eam").exists()
    assert not TraceStore("b").policy_state_path("eam").exists()


def test_state_of_another_version_or_corrupt_is_ignored(caplog):
    ts = TraceStore("m")
    ts.write_policy_state("eam", {"key": np.array("eam-v0"), "weights": np.ones((3, 3))})
    p = make_policy("eam", model_name="m")
    p.setup(L, E, 12)
    np.testing.assert_allclose(p.weights, initial_weights())
    ts.policy_state_path("eam").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="moeinf.trace"):
        p = make_policy("eam", model_name="m")
        p.setup(L, E, 12)
    np.testing.assert_allclose(p.weights, initial_weights())
    assert "unreadable" in caplog.text


def test_policy_state_is_atomic_named_and_removed_with_the_traces():
    ts = TraceStore("m")
    with pytest.raises(MoeinfError):
        ts.write_policy_state("../x", {"a": np.zeros(1)})
    ts.write_policy_state("eam", {"a": np.arange(3)})
    assert ts.read_policy_state("eam")["a"].tolist() == [0, 1, 2]
    assert not [p for p in ts.dir.iterdir() if p.name.startswith(".tmp")]
    assert ts.remove()
    assert ts.read_policy_state("eam") is None
