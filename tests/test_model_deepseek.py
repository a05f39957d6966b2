"""DeepSeek-V2 and DeepSeek-V3 fidelity on tiny random models (tests/tiny_models.py) against transformers.

V2 tiny: MLA without q_lora, yarn rope with mscale (softmax scale), group-limited greedy routing,
routed scaling, a dense first layer, shared experts. V3 tiny: MLA with q_lora, sigmoid router with a
random correction bias, group-limited top-k, renormalised and scaled, a dense first layer, shared experts.
"""

from __future__ import annotations

import pytest
import torch
from deepseek_gpt_oss_fidelity import build_store, check_bf16, check_greedy, check_prefill_and_decode

from engine.model.families.deepseek.mla import MultiHeadLatentAttention
from engine.model.layers.moe import MoEBlock
from engine.model.loader import load_model

FAMILIES = ("deepseek_v2", "deepseek_v3")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)




@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    # V2 from the per-expert checkpoint layout, V3 from the fused one (save_original_format=False)
    layout = "per_expert" if request.param == "deepseek_v2" else "fused"
    ckpt, store = build_store(request.param, tmp_path_factory.mktemp(request.param), layout=layout)
    return request.param, ckpt, store


def test_structure(tiny):
    """Layer 0 dense (first_k_dense_replace=1), later layers MoE with shared experts, MLA attention."""
    family, _, store = tiny
    model = load_model(store, torch.float32, max_seq_len=32)
    assert not isinstance(model.layers[0].mlp, MoEBlock)
    for layer in model.layers[1:]:
        assert isinstance(layer.mlp, MoEBlock) and layer.mlp.shared_expert is not None
    assert all(isinstance(layer.self_attn, MultiHeadLatentAttention) for layer in model.layers)
    attn = model.layers[0].self_attn
    assert (attn.args.q_lora_rank is None) == (family == "deepseek_v2")
    if family == "deepseek_v3":
        assert model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0
        # the correction bias stays float32 in a bf16 model, as transformers keeps it
        gate = load_model(store, torch.bfloat16, max_seq_len=16).layers[1].mlp.gate
        assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32


def test_prefill_logits_and_decode_match_transformers(tiny):
    _, ckpt, store = tiny
    check_prefill_and_decode(ckpt, store)


def test_32_greedy_tokens_match_transformers_generate(tiny):
    _, ckpt, store = tiny
    check_greedy(ckpt, store, n=32)


def test_bf16_within_tolerance(tiny):
    _, ckpt, store = tiny
    check_bf16(ckpt, store)
