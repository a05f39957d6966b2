"""Batched forward (``CausalLM.forward_batch``): several sequences of different lengths and positions in
one pass, prefill and decode mixed, give each sequence the logits and greedy tokens it gets alone."""

from __future__ import annotations

import pytest
import torch
from memory_models import greedy, tiny_store
from tiny_models import MOE_FAMILIES

from engine.model.loader import load_model

PROMPTS = ([5, 17, 99], [3, 44, 12, 8, 150, 77, 21], [9] * 2 + list(range(40, 52)), [260, 1, 33, 4, 5])


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def store(request, tmp_path_factory):
    return tiny_store(request.param, tmp_path_factory.mktemp(request.param))


def _batched_greedy(model, prompts: list[list[int]], steps: int, join_at: list[int]) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one batch: prompt i joins at step ``join_at[i]`` (its
    prefill rides along with the others' decode) and leaves after ``steps`` tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    pos = [0] * len(prompts)
    t = 0
    while any(len(o) < steps for o in out):
        tokens, segments, who = [], [], []
        for i, p in enumerate(prompts):
            if join_at[i] > t or len(out[i]) >= steps:
                continue
            run = p if not out[i] else [out[i][-1]]
            tokens += run
            segments.append((i, pos[i], len(run)))
            who.append(i)
        if segments:
            logits = model.forward_batch(torch.tensor(tokens), segments)
            for row, i in enumerate(who):
                pos[i] += segments[row][2]
                out[i].append(int(logits[row].argmax()))
        t += 1
    return out


def test_batch_greedy_equals_single_runs(store):
    model = load_model(store, dtype=torch.float32, max_seq_len=64)
    alone = [greedy(model, p, 10) for p in PROMPTS]
    model.setup_caches(64, torch.float32, "cpu", slots=len(PROMPTS))
    got = _batched_greedy(model, [list(p) for p in PROMPTS], 10, join_at=[0, 0, 3, 5])
    assert got == alone


def test_batch_logits_match_single_forward(store):
    model = load_model(store, dtype=torch.float32, max_seq_len=64)
    ref = []
    for p in PROMPTS[:3]:
        with torch.inference_mode():
            ref.append(model.forward(torch.tensor(p[:-1]), 0)[-1:])  # prefix, then the last token alone
            ref[-1] = model.forward(torch.tensor(p[-1:]), len(p) - 1)[-1]
    model.setup_caches(64, torch.float32, "cpu", slots=3)
    # sequence 0 and 1 prefill their prefixes, sequence 2 prefills all but its last token in the same pass
    model.forward_batch(
        torch.tensor([t for p in PROMPTS[:3] for t in p[:-1]]),
        [(i, 0, len(p) - 1) for i, p in enumerate(PROMPTS[:3])],
    )
    # one decode row per sequence, each at its own position, slots in another order
    order = [2, 0, 1]
    logits = model.forward_batch(
        torch.tensor([PROMPTS[i][-1] for i in order]), [(i, len(PROMPTS[i]) - 1, 1) for i in order]
    )
    for row, i in enumerate(order):
        torch.testing.assert_close(logits[row], ref[i], rtol=1e-5, atol=1e-5)


def test_batch_segments_are_checked(store):
    model = load_model(store, dtype=torch.float32, max_seq_len=16)
    model.setup_caches(16, torch.float32, "cpu", slots=2)
    with pytest.raises(ValueError, match="used twice"):
        model.forward_batch(torch.tensor([1, 2]), [(0, 0, 1), (0, 1, 1)])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_batch(torch.tensor([1]), [(2, 0, 1)])
    with pytest.raises(ValueError, match="add up"):
        model.forward_batch(torch.tensor([1, 2, 3]), [(0, 0, 1), (1, 0, 1)])
