"""Traces carry over: a second session of a tiny model starts from the first one's recorded EAMs and
hits its expert cache more often on the same prompts than the first session (a fresh store) did."""

from __future__ import annotations

import json

import pytest
import torch
from memory_models import greedy
from runtime_store import pull_tiny

from engine.memory import open_experts
from engine.model.loader import load_model
from engine.store.families import moe_layout
from engine.trace.recorder import TraceRecorder
from engine.trace.store import TraceStore

PROMPTS = [[5, 9, 17, 33, 2, 8, 40, 41], [7, 7, 3, 60, 61, 62], [100, 12, 13, 14, 90]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    home, root, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("sessions"), name="tiny")
    return home, root


def run_session(root, budget: str) -> tuple[int, int, list[list[int]]]:
    """(hits, accesses, generated tokens) of one session: every prompt, greedy, the eam policy."""
    layout = moe_layout(json.loads((root / "config.json").read_text()))
    rec = TraceRecorder(root.name, layout.num_layers, layout.num_experts)
    src = open_experts(root, torch.float32, "cpu", budget, "eam", recorder=rec, prefetch=False)
    try:
        model = load_model(root, dtype=torch.float32, device="cpu", experts=src, max_seq_len=128)
        outs = []
        for prompt in PROMPTS:
            rec.begin_sequence()
            src.begin_sequence()
            outs.append(greedy(model, prompt, 16))
            rec.end_sequence()
        st = src.stats()
    finally:
        src.close()
    return st.hits, st.accesses, outs


@pytest.mark.parametrize("budget", ["25%"])
def test_second_session_hits_more_than_a_fresh_store(tiny, budget, monkeypatch):
    home, root = tiny
    monkeypatch.setenv("MOEINF_HOME", str(home))
    TraceStore(root.name).remove()
    hits1, acc1, out1 = run_session(root, budget)
    stored = TraceStore(root.name).read()
    assert stored is not None and stored.collection.requests == len(PROMPTS)
    assert TraceStore(root.name).read_policy_state("eam") is not None  # eam's learned weights, for the next
    hits2, acc2, out2 = run_session(root, budget)
    assert out2 == out1 and acc2 == acc1  # same prompts, same routing, same tokens
    assert hits2 / acc2 > hits1 / acc1
    assert TraceStore(root.name).read().collection.requests == 2 * len(PROMPTS)
