"""`moeinf pull` of a GGUF file and with --upcycle: the pull calls engine.store.gguf / engine.upcycle (a
transform passed in from above the store) and stores the result like any checkpoint, recording where it
came from."""

from __future__ import annotations

import torch
from gguf_testlib import write_gguf
from safetensors.torch import load_file
from tiny_models import make_tiny_checkpoint, make_tiny_model, make_tokenizer

from engine.store.manifest import read_manifest
from engine.store.paths import expert_shard_path, moeinf_home
from engine.store.pull import pull_model
from engine.store.verify import verify_model


def test_pull_gguf_file(tmp_path):
    model = make_tiny_model("mixtral")
    tok = tmp_path / "tok"
    tok.mkdir()
    make_tokenizer(tok)
    path = write_gguf(model, "mixtral", tok, tmp_path / "Tiny-Mix.gguf")

    r = pull_model(str(path), dtype="fp32")
    assert r.name == "tiny-mix"
    m = r.manifest
    assert m["family"] == "mixtral" and m["num_experts"] == 8
    assert m["source"] == {"kind": "gguf", "path": str(path.resolve())}
    assert (r.path / "tokenizer.json").is_file() and verify_model(r.path).ok
    # expert 3 of layer 1 is the transformers model's expert 3
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach()[3]
    shard = load_file(str(expert_shard_path(r.path, 1, 3)))
    half = gate_up.shape[0] // 2
    assert torch.equal(shard["gate_proj.weight"], gate_up[:half])
    assert pull_model(str(path), dtype="fp32").up_to_date
    assert not (moeinf_home() / "tmp" / "tiny-mix").exists()


def test_pull_with_upcycle(tmp_path):
    from engine.upcycle import Upcycle

    src = make_tiny_checkpoint("llama", tmp_path / "dense")
    r = pull_model(str(src), transform=Upcycle(4, 2, max_new_tokens=8))  # a short router calibration: fast
    assert r.name == "dense-moe4"
    m = read_manifest(r.path)
    assert m["family"] == "mixtral" and m["num_experts"] == 4 and m["top_k"] == 2
    assert m["source"]["upcycled"] == {"from": {"kind": "local", "path": str(src.resolve())}, "num_experts": 4, "top_k": 2}
    dense = load_file(str(src / "model.safetensors"))
    for e in range(4):  # every expert is an exact copy of the layer's dense FFN
        shard = load_file(str(expert_shard_path(r.path, 0, e)))
        assert torch.equal(shard["gate_proj.weight"], dense["model.layers.0.mlp.gate_proj.weight"])
        assert torch.equal(shard["down_proj.weight"], dense["model.layers.0.mlp.down_proj.weight"])
    assert pull_model(str(src), transform=Upcycle(4, 2, max_new_tokens=8)).up_to_date
