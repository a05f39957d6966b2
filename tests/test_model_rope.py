"""Rotary embeddings: parameters parsed from old and new config styles, inverse frequencies equal
to transformers' for every scaling type, and whole tiny Llama models with each scaling type (and
Mixtral with a sliding window) equal to transformers."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from model_fidelity import pull_config, ref_logits
from tiny_models import tiny_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.errors import MoeinfError
from engine.model.layers.rope import inv_freq_for, rope_parameters
from engine.model.loader import load_model

VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 5000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    "yarn_no_truncate": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 3.0, "truncate": False,
                         "original_max_position_embeddings": 8},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}


def _llama_config(rope: dict, max_pos: int = 32) -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos, initializer_range=0.15,
        rope_parameters=copy.deepcopy(rope), bos_token_id=0, eos_token_id=1, pad_token_id=4,
    )


def test_rope_parameters_old_style():
    cfg = {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 64}
    assert rope_parameters(cfg) == {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    cfg = {"rope_theta": 1e6, "rope_scaling": None}
    assert rope_parameters(cfg) == {"rope_type": "default", "rope_theta": 1e6}
    cfg = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 4096}
    p = rope_parameters(cfg, default_theta=7.0)
    assert p["rope_theta"] == 7.0 and p["original_max_position_embeddings"] == 4096


def test_rope_parameters_new_style_and_nested():
    cfg = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert rope_parameters(cfg)["rope_type"] == "llama3"
    nested = {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3.0}}}
    assert rope_parameters(nested) == {"rope_type": "default", "rope_theta": 3.0}
    with pytest.raises(MoeinfError, match="longrope"):
        rope_parameters({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}, "max_position_embeddings": 8})


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("seq_len", [None, 100])
def test_inv_freq_matches_transformers(name, seq_len):
    config = _llama_config(VARIANTS[name])
    params = rope_parameters(config.to_dict())
    ours, our_factor = inv_freq_for(params, config.head_dim, config.max_position_embeddings, seq_len=seq_len)
    rope_type = params["rope_type"]
    if rope_type == "default":
        theirs = 1.0 / (params["rope_theta"] ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        their_factor = 1.0
    else:
        theirs, their_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert our_factor == pytest.approx(their_factor)


@pytest.fixture(scope="module")
def rope_root(tmp_path_factory):
    return tmp_path_factory.mktemp("rope_models")


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "llama3"])
def test_llama_with_scaled_rope_matches_transformers(name, rope_root):
    """Prompts longer than max_position_embeddings (16), so the dynamic type recomputes too."""
    ckpt, store, ref = pull_config(_llama_config(VARIANTS[name], max_pos=16), rope_root, f"llama-{name}")
    model = load_model(store, max_seq_len=64)
    g = torch.Generator().manual_seed(5)
    prompt = torch.cat([torch.tensor([0]), torch.randint(5, 384, (23,), generator=g)])
    assert (model(prompt, 0) - ref_logits(ref, prompt)).abs().max().item() < 1e-4
    ids = prompt[None]
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            eos_token_id=[], pad_token_id=4)[0, len(prompt):].tolist()
    logits, pos, got = model(prompt, 0), len(prompt), []
    for _ in range(12):
        got.append(int(logits[-1].argmax()))
        logits = model(torch.tensor(got[-1:]), pos)
        pos += 1
    assert got == expected


def test_mixtral_sliding_window_matches_transformers(rope_root):
    config = tiny_config("mixtral")
    config.sliding_window = 5
    ckpt, store, ref = pull_config(config, rope_root, "mixtral-window")
    model = load_model(store, max_seq_len=64)
    g = torch.Generator().manual_seed(6)
    tokens = torch.cat([torch.tensor([0]), torch.randint(5, 384, (20,), generator=g)])
    expected = ref_logits(ref, tokens)
    assert (model(tokens, 0) - expected).abs().max().item() < 1e-4
    # chunked prefill and decode past the window
    parts = [model(tokens[:3], 0), model(tokens[3:11], 3)] + [model(tokens[p : p + 1], p) for p in range(11, 21)]
    assert (torch.cat(parts) - expected).abs().max().item() < 1e-4
