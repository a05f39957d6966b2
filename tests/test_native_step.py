"""The native decode step over every layer (engine/model/native_step.py, cuda_ext/csrc/cpu/step.c) gives
the same bits as the layers called one by one, with the expert source's hooks (routing observed, hits
counted) as if fetched, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import loader
from engine.bench.synthetic import make_synthetic_model
from engine.memory.open import open_experts
from engine.model.loader import load_model

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler for the native kernels")


def _decode(model, prompt, steps):
    model.forward(prompt, 0)
    tok, logits = prompt[-1:], []
    for i in range(steps):
        out = model.forward(tok, len(prompt) + i)
        logits.append(out)
        tok = out[-1:].argmax(-1)
    return torch.cat(logits)


class Recorder:
    def __init__(self):
        self.routes = []

    def on_route(self, layer, ids):
        self.routes.append((layer, ids.tolist()))


@pytest.mark.parametrize("family,experts,top_k", [("qwen3_moe", 16, 4), ("mixtral", 8, 2), ("olmoe", 8, 3)])
def test_native_step_is_the_layers_one_by_one(family, experts, top_k):
    root = make_synthetic_model(f"step-{family}", family, num_layers=3, num_experts=experts, top_k=top_k,
                                hidden=128, intermediate=96, vocab=300, head_dim=32, kv_heads=2, heads=4)
    prompt = torch.tensor([1, 17, 40, 99, 7, 23])
    runs = []
    for native in (True, False):
        rec = Recorder()
        source = open_experts(root, torch.bfloat16, "cpu", budget=None, recorder=rec)
        model = load_model(root, dtype=torch.bfloat16, experts=source, max_seq_len=64)
        model.native_step = native
        logits = _decode(model, prompt, 12)
        assert (model._step is not False and model._step is not None) == native
        runs.append((logits, rec.routes, source.stats()))
    (a, routes_a, st_a), (b, routes_b, st_b) = runs
    assert torch.equal(a, b)
    assert routes_a == routes_b  # the recorder saw every layer's routing, in order
    assert (st_a.accesses, st_a.hits, st_a.layer_hits) == (st_b.accesses, st_b.hits, st_b.layer_hits)


def test_native_step_steps_aside_under_a_budget_and_for_float32():
    root = make_synthetic_model("step-aside", "qwen3_moe", num_layers=2, num_experts=8, top_k=2, hidden=128,
                                intermediate=64, vocab=300, head_dim=32)
    cached = open_experts(root, torch.bfloat16, "cpu", budget="50%")
    model = load_model(root, dtype=torch.bfloat16, experts=cached, max_seq_len=32)
    _decode(model, torch.tensor([1, 2, 3]), 3)
    assert model._step is None  # the cache's fetch decides what is loaded: the layers run one by one
    model32 = load_model(root, dtype=torch.float32, max_seq_len=32)
    _decode(model32, torch.tensor([1, 2, 3]), 3)
    assert model32._step is False  # never tried
