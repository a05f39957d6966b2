"""Sparse upcycling on a tiny llama: exact copies, k-means routers, same answers as the dense model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_checkpoint

from engine.errors import MoeinfError
from engine.upcycle.checkpoint import UPCYCLED_KEY, upcycle_checkpoint
from engine.upcycle.router import router_weights, spherical_kmeans

PROMPTS = ["The capital of France is", "def square(x):", "Once upon a time there was"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    dense = make_tiny_checkpoint("llama", root / "dense")
    moe = upcycle_checkpoint(dense, root / "moe", num_experts=8, top_k=2, dtype="float32", max_new_tokens=12)
    return dense, moe


def test_experts_are_exact_copies_and_config_says_upcycled(tiny):
    dense, moe = tiny
    src = load_file(str(dense / "model.safetensors"))
    out = load_file(str(moe / "model.safetensors"))
    cfg = json.loads((moe / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    rec = cfg[UPCYCLED_KEY]
    assert rec["trained"] is False and rec["num_experts"] == 8 and rec["top_k"] == 2
    assert rec["calibration_tokens"] > 8 * 5
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for e in range(8):
            for hf, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                assert torch.equal(out[f"{p}.block_sparse_moe.experts.{e}.{w}.weight"], src[f"{p}.mlp.{hf}.weight"])
        assert out[f"{p}.block_sparse_moe.gate.weight"].shape == (8, cfg["hidden_size"])
        assert f"{p}.mlp.gate_proj.weight" not in out
    for name, t in src.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], t), name
    assert (moe / "tokenizer.json").is_file() and (moe / "chat_template.jinja").is_file()


def test_transformers_mixtral_of_upcycled_model_equals_dense_llama(tiny):
    """The upcycled checkpoint, read by transformers' Mixtral, computes the dense model's logits."""
    from transformers import AutoModelForCausalLM

    dense, moe = tiny
    d = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    m = AutoModelForCausalLM.from_pretrained(str(moe), dtype=torch.float32).eval()
    assert type(m).__name__ == "MixtralForCausalLM"
    ids = torch.randint(5, d.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, d(ids).logits, rtol=1e-5, atol=1e-5)


def test_engine_answers_of_upcycled_model_equal_dense_for_any_budget(tiny):
    """Greedy answers through moeinf are identical for the dense and the upcycled model, any budget."""
    import engine
    from engine.store.pull import pull_model

    dense, moe = tiny
    pull_model(str(dense), name="tiny-dense", dtype="fp32")
    pull_model(str(moe), name="tiny-moe", dtype="fp32")
    base = engine.load("tiny-dense", ctx=128)
    want = {p: "".join(x for x in base.generate(p, raw=True, temperature=0, num_predict=10) if isinstance(x, str))
            for p in PROMPTS}
    for budget in (None, "25%", "50%"):
        s = engine.load("tiny-moe", ctx=128, expert_budget=budget)
        for p in PROMPTS:
            s.reset()
            got = "".join(x for x in s.generate(p, raw=True, temperature=0, num_predict=10) if isinstance(x, str))
            assert got == want[p], (budget, p)


def test_router_follows_the_hidden_state():
    """Points drawn around 4 directions (plus a big shared mean) are routed by their cluster."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen) * 3
    labels = torch.arange(400) % 4
    x = torch.randn(32, generator=gen) * 10 + centres[labels] + 0.3 * torch.randn(400, 32, generator=gen)
    router = router_weights(x, num_experts=4, top_k=1)
    top = (x @ router.weight.T).argmax(-1)
    for c in range(4):  # every true cluster lands on one expert, different clusters on different experts
        assert torch.unique(top[labels == c]).numel() == 1
    assert torch.unique(top).numel() == 4
    margin = (x @ router.weight.T).topk(2).values
    assert float((margin[:, 0] - margin[:, 1]).median()) == pytest.approx(4.0, rel=1e-3)


def test_router_follows_the_slow_context_not_the_loud_token_noise():
    """Sequences = a small per-sequence offset (slow) + large per-token noise in a few fixed directions
    (fast). With sequence lengths the router groups tokens by sequence, so consecutive tokens share."""
    gen = torch.Generator().manual_seed(0)
    seqs, length, dim = 8, 40, 24
    context = torch.randn(seqs, dim, generator=gen)
    loud = torch.randn(6, dim, generator=gen) * 4
    x = torch.cat([context[s] + torch.randn(length, 6, generator=gen) @ loud for s in range(seqs)])
    lengths = [length] * seqs
    slow = router_weights(x, num_experts=4, top_k=1, lengths=lengths, slow_dims=4)
    plain = router_weights(x, num_experts=4, top_k=1)

    def stay(router) -> float:
        top = (x @ router.weight.T).argmax(-1).view(seqs, length)
        return (top[:, 1:] == top[:, :-1]).float().mean().item()

    assert stay(slow) > 0.9 > stay(plain)


def test_spherical_kmeans_returns_unit_centroids():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    c = spherical_kmeans(x, 5)
    assert c.shape == (5, 8)
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(5))


def test_bad_requests_are_one_line_errors(tmp_path, tiny):
    dense, moe = tiny
    with pytest.raises(MoeinfError, match="dense llama"):
        upcycle_checkpoint(moe, tmp_path / "x", 8, 2)
    with pytest.raises(MoeinfError, match="top-k"):
        upcycle_checkpoint(dense, tmp_path / "x", 4, 5)
    with pytest.raises(MoeinfError, match="at least 2 experts"):
        upcycle_checkpoint(dense, tmp_path / "x", 1, 1)
    with pytest.raises(MoeinfError, match="no config.json"):
        upcycle_checkpoint(tmp_path, tmp_path / "x", 8, 2)
    assert not (tmp_path / "x").exists()
