"""Released DeepSeek-V2-Lite / DeepSeek-V3 and gpt-oss-20b config.json files (hub format: legacy
``rope_scaling``, ``torch_dtype``, extra keys) map onto the right structure, and their rope and MLA
softmax scale equal what transformers derives from the same dict. Built on the meta device: no weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as tv2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as tv3
from transformers.models.gpt_oss import modeling_gpt_oss as tgo

from engine.model.args import ModelArgs
from engine.model.families.deepseek.mla import MultiHeadLatentAttention
from engine.model.families.deepseek.router import DeepseekV2Router, DeepseekV3Router
from engine.model.families.gpt_oss.attention import SinkAttention
from engine.model.layers.moe import MoEBlock
from engine.model.layers.rope import inv_freq_for
from engine.store.families import get_family

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128,
    "vocab_size": 129280, "tie_word_embeddings": False,
}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400, "tie_word_embeddings": False,
}
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "rms_norm_eps": 1e-05, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 201088,
}


def _build(config: dict):
    family = get_family(config["model_type"])
    args = ModelArgs.from_family(family, dict(config))
    with torch.device("meta"):
        model = family.build(args, experts=None)
    return args, model


@pytest.mark.parametrize("config", [DEEPSEEK_V2_LITE, DEEPSEEK_V3], ids=["v2-lite", "v3"])
def test_deepseek_hub_config(config):
    args, model = _build(config)
    ref_cfg = tf.AutoConfig.for_model(**config)
    modeling = tv2 if config["model_type"] == "deepseek_v2" else tv3
    assert len(model.layers) == config["num_hidden_layers"]
    first = config["first_k_dense_replace"]
    for i, layer in enumerate(model.layers):
        assert isinstance(layer.self_attn, MultiHeadLatentAttention)
        assert isinstance(layer.mlp, MoEBlock) == (i >= first)
    moe = model.layers[first].mlp
    assert moe.shared_expert.gate_proj.weight.shape[0] == config["moe_intermediate_size"] * config["n_shared_experts"]
    assert moe.gate.top_k == config["num_experts_per_tok"]
    if config["model_type"] == "deepseek_v2":
        assert isinstance(moe.gate, DeepseekV2Router) and moe.gate.topk_method == "greedy"
    else:
        assert isinstance(moe.gate, DeepseekV3Router)
        assert (moe.gate.n_group, moe.gate.topk_group, moe.gate.routed_scaling_factor) == (8, 4, 2.5)
    attn = model.layers[0].self_attn
    assert (attn.args.q_lora_rank is None) == (config["q_lora_rank"] is None)
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    assert attn.args.softmax_scale == pytest.approx(modeling.yarn_apply_mscale(ref_cfg.rope_parameters, qk**-0.5))
    assert attn.args.softmax_scale != pytest.approx(qk**-0.5) or config["rope_scaling"]["mscale_all_dim"] == 0
    rotary = (tv2.DeepseekV2RotaryEmbedding if modeling is tv2 else tv3.DeepseekV3RotaryEmbedding)(ref_cfg)
    inv_freq, factor = inv_freq_for(args.rope, config["qk_rope_head_dim"], args.max_position_embeddings)
    torch.testing.assert_close(inv_freq, rotary.inv_freq)
    assert factor == pytest.approx(rotary.attention_scaling)


def test_gpt_oss_hub_config():
    args, model = _build(GPT_OSS_20B)
    ref_cfg = tf.AutoConfig.for_model(**GPT_OSS_20B)
    assert [layer.self_attn.sliding_window for layer in model.layers] == [128, None] * 12
    assert all(isinstance(layer.self_attn, SinkAttention) for layer in model.layers)
    assert model.layers[0].self_attn.q_proj.bias is not None
    assert model.layers[0].mlp.gate.top_k == 4 and model.layers[0].mlp.gate.num_experts == 32
    rotary = tgo.GptOssRotaryEmbedding(ref_cfg)
    inv_freq, factor = inv_freq_for(args.rope, 64, args.max_position_embeddings)
    torch.testing.assert_close(inv_freq, rotary.inv_freq)
    assert factor == pytest.approx(rotary.attention_scaling) and factor > 1.3


def test_moe_layer_freq_and_no_shared_experts():
    """DeepSeek's own code makes layer i sparse when i >= first_k_dense_replace and i % moe_layer_freq == 0
    (transformers ignores moe_layer_freq, 1 in every release); n_shared_experts 0 means no shared MLP."""
    config = dict(DEEPSEEK_V2_LITE, num_hidden_layers=7, moe_layer_freq=2, first_k_dense_replace=1, n_shared_experts=0)
    _, model = _build(config)
    sparse = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)]
    assert sparse == [2, 4, 6]
    assert all(model.layers[i].mlp.shared_expert is None for i in sparse)
    assert model.layers[3].mlp.gate_proj.weight.shape[0] == config["intermediate_size"]
