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
