"""The real SmolLM2 GGUF's tokenizer, rebuilt from its metadata, against transformers' GGUF tokenizer."""

from __future__ import annotations

import json

import pytest
from gguf_testlib import TEXTS, smollm2_gguf

from engine.store import gguf_tokenizer
from engine.store.gguf import _arch_config, _open, read_metadata

MORE = [
    "Paris, 75001 — 2,148,271 inhabitants (2020); écoles, cafés & crème brûlée!",
    'x = [i ** 2 for i in range(10) if i % 3 != 0]\nprint(f"{x!r:>20}")',
    "   \n\t  multiple   spaces\r\nand CRLF",
    "<|endoftext|><repo_name>moeinf<file_sep>README.md",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = smollm2_gguf()
    reader = _open(path)
    meta = read_metadata(reader)
    out = tmp_path_factory.mktemp("smol-tok")
    gguf_tokenizer.build_tokenizer(meta).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(gguf_tokenizer.tokenizer_config(meta, 8192)))
    ours = PreTrainedTokenizerFast.from_pretrained(str(out))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return meta, reader, ours, theirs, out


def test_real_tokenizer_matches_transformers(smol):
    _, _, ours, theirs, _ = smol
    for text in TEXTS + MORE:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours("2024")["input_ids"] == [ours.convert_tokens_to_ids(d) for d in "2024"]  # digits split


def test_real_chat_template_and_special_tokens(smol):
    from engine.runtime.tokenizer import Tokenizer

    meta, _, ours, theirs, out = smol
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert cfg["add_bos_token"] is False
    assert gguf_tokenizer.eos_token_ids(meta) == [2]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert want.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert Tokenizer(out).apply_chat_template(messages) == want
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == want


def test_real_config_from_metadata(smol):
    meta, reader, _, _, _ = smol
    cfg = _arch_config(meta, {t.name for t in reader.tensors})
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 8192


def test_real_q4_1_gguf_is_stored_as_it_comes_and_answers(tmp_path, monkeypatch):
    """The demo's GGUF: its Q4_1 (and Q8_0 embedding) blocks are stored as they are, about a third of
    the bf16 size, and the model computing on them answers the demo question."""
    import engine
    from engine.store.pull import pull_model

    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    m = pull_model(str(smollm2_gguf()), name="smol").manifest
    dense = m["formats"]["dense"]
    assert dense["model.layers.0.mlp.gate_proj.weight"] == "q4_1"
    assert dense["model.layers.0.self_attn.q_proj.weight"] == "q4_1"
    assert dense["model.embed_tokens.weight"] == "q8_0"
    assert dense["model.norm.weight"] == "f32"
    assert m["total_bytes"] < 110e6  # bf16 would be 270 MB
    session = engine.load("smol", ctx=256)
    # float32: the tied LM head computes on the embedding's stored Q8_0 blocks (the lookup on the
    # dequantised table), the dequantised head's logits up to float32 summation order
    import torch

    from cuda_ext import loader
    from engine.formats.tensor import QuantTensor

    head, table = session.model.lm_head.weight, session.model.embed_tokens.weight
    if loader.cpu() is None:  # MOEINF_NATIVE_KERNELS=0: the dequantised table, as the embedding
        assert head is table
    else:
        assert isinstance(head, QuantTensor) and head.format.name == "q8_0"
        x = torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ours = session.model.lm_head(x)
        exact = x.double() @ table.double().T
        mag = x.double().abs() @ table.double().abs().T
        assert ((ours.double() - exact).abs() <= 1.01 * (table.shape[1] // 64 + 9) * 2.0**-24 * mag).all()
    reply = "".join(
        p
        for p in session.generate("What is the capital of France?", temperature=0, num_predict=12)
        if isinstance(p, str)
    )
    assert "Paris" in reply
