"""Synthetic store models: shapes, the store layout and manifest, aligned expert shards, loadable."""

from __future__ import annotations

import pytest
import torch

from engine.bench.synthetic import (
    SYNTHETIC_SHAPES,
    make_synthetic_from_shape,
    make_synthetic_model,
    synthetic_shape,
)
from engine.errors import MoeinfError
from engine.model.loader import load_model
from engine.store.header import read_header
from engine.store.manifest import read_manifest, resolve_model
from engine.store.paths import expert_shard_path


def test_real_shapes_and_scale():
    assert {"gpt-oss-20b", "deepseek-v3", "qwen3-30b-a3b"} <= set(SYNTHETIC_SHAPES)
    g = SYNTHETIC_SHAPES["gpt-oss-20b"]
    assert (g.num_layers, g.num_experts, g.top_k, g.head_dim) == (24, 32, 4, 64)
    m = SYNTHETIC_SHAPES["mixtral-8x7b"]
    assert (m.num_layers, m.num_experts, m.top_k, m.hidden, m.intermediate) == (32, 8, 2, 4096, 14336)
    s = synthetic_shape("mixtral-8x7b", 0.25)
    assert (s.num_layers, s.num_experts, s.top_k) == (32, 8, 2)
    assert s.hidden == 1024 and s.intermediate == 3584 and s.heads * s.head_dim == s.hidden
    assert s.heads % s.kv_heads == 0
    with pytest.raises(MoeinfError):
        synthetic_shape("mixtral-9000")
    with pytest.raises(MoeinfError):
        synthetic_shape("mixtral-8x7b", 2.0)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_written_into_the_store_and_loadable(family):
    root = make_synthetic_model(f"syn-{family}", family, num_layers=2, num_experts=4, top_k=2, hidden=64,
                                intermediate=96, vocab=300, dtype=torch.bfloat16, head_dim=16)
    assert resolve_model(f"syn-{family}") == root  # a store name like any pulled model
    manifest = read_manifest(root)
    assert manifest["family"] == family and manifest["num_experts"] == 4 and manifest["top_k"] == 2
    for rel, info in manifest["files"].items():
        assert (root / rel).stat().st_size == info["size"]
    assert len(list((root / "experts").rglob("*.safetensors"))) == 2 * 4
    h = read_header(expert_shard_path(root, 1, 3))
    assert h.data_start % 4096 == 0  # direct reads land tensors in place
    assert {k: v.shape for k, v in h.tensors.items()} == {
        "gate_proj.weight": (96, 64), "up_proj.weight": (96, 64), "down_proj.weight": (64, 96)}
    model = load_model(root, dtype=torch.float32, max_seq_len=32)
    logits = model.forward(torch.tensor([1, 10, 20, 30]), 0)
    assert logits.shape == (4, 300) and torch.isfinite(logits).all()
    from engine.runtime.tokenizer import Tokenizer

    tok = Tokenizer(root)
    ids = tok.encode("hello world")
    assert tok.decode(ids).endswith("hello world")


@pytest.mark.parametrize("family,experts", [("gpt_oss", 4), ("deepseek_v3", 16)])
def test_gpt_oss_and_deepseek_synthetic_models_load_and_decode(family, experts):
    """Their own tensors (gpt-oss: attention biases, sinks, router bias, expert biases; DeepSeek-V3: latent
    attention, correction bias, shared expert) are written under the names a pull stores, so the model
    loads them all; one token decoded after a prefill gives the prefill's own last logits."""
    root = make_synthetic_model(f"syn-{family}", family, num_layers=2, num_experts=experts, top_k=2, hidden=128,
                                intermediate=64, vocab=300, dtype=torch.bfloat16, head_dim=32)
    names = set(read_header(root / "dense" / "part-00001.safetensors").tensors)
    if family == "gpt_oss":
        assert {"model.layers.1.self_attn.sinks", "model.layers.1.mlp.router.bias"} <= names
        assert "gate_proj.bias" in read_header(expert_shard_path(root, 0, 0)).tensors
    else:
        assert {"model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                "model.layers.1.mlp.shared_experts.down_proj.weight"} <= names
        assert "model.layers.1.self_attn.q_proj.weight" not in names
    model = load_model(root, dtype=torch.float32, max_seq_len=32)
    tokens = torch.tensor([1, 10, 20, 30, 40])
    full = model.forward(tokens, 0)
    assert torch.isfinite(full).all()
    model.forward(tokens[:4], 0)
    step = model.forward(tokens[4:], 4)
    assert torch.allclose(step[0], full[4], atol=1e-4, rtol=1e-4)


def test_same_seed_same_weights_and_kept_unless_overwrite(tmp_path):
    from dataclasses import replace

    shape = replace(synthetic_shape("olmoe-1b-7b", 1 / 32), num_layers=2, num_experts=4, vocab=300)
    a = make_synthetic_from_shape("a", shape, dtype=torch.float32, seed=3, root=tmp_path)
    b = make_synthetic_from_shape("b", shape, dtype=torch.float32, seed=3, root=tmp_path)
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["files"]["experts/L0/E0.safetensors"] == mb["files"]["experts/L0/E0.safetensors"]
    before = (a / "manifest.json").stat().st_mtime_ns
    make_synthetic_from_shape("a", shape, dtype=torch.float32, seed=3, root=tmp_path)
    assert (a / "manifest.json").stat().st_mtime_ns == before
