"""moeinf's model code against transformers on the same tiny random weights (B1 families), each
checkpoint pulled into a store by the real converter.

For mixtral, qwen2_moe, qwen3_moe, olmoe and llama (dense):
* fp32 prefill logits within 1e-4 of transformers on several prompts;
* 32 greedy tokens identical to transformers' greedy ``generate`` (EOS not stopping either side);
* chunked prefill + token-by-token decode over the static KV cache equals one full pass;
* rewinding (running from an earlier ``start_pos``) overwrites the cache correctly;
* bf16: moeinf bf16 prefill logits vs transformers bf16 logits (same weights) within 0.02 (they
  are bit-identical today), prefill + decode within 0.15 (decode goes through the native bf16 GEMV
  of cuda_ext.cpu and another attention path, so roundings differ), the error of
  moeinf bf16 against the fp32 reference at most 1.25x transformers' own bf16 error + 0.03, and the
  argmax agreeing with the fp32 reference on >= 85% of positions and no less than
  transformers' bf16 agreement - 5 points.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_fidelity import pull_tiny, ref_logits
from tiny_models import load_reference

from engine.model.loader import load_model

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama")
ATOL_FP32 = 1e-4
BF16_ATOL_VS_TRANSFORMERS = 0.15
BF16_PREFILL_ATOL_VS_TRANSFORMERS = 0.02
BF16_SLACK = 0.03


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out = [torch.tensor([0]), torch.tensor([0, 2, 5, 17, 99, 3])]
    for n in (13, 37):
        out.append(torch.cat([torch.tensor([0]), torch.randint(5, 384, (n,), generator=g)]))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"fid_{family}")
    ckpt, store = pull_tiny(family, root)
    ref = load_reference(ckpt)
    model = load_model(store, dtype=torch.float32, max_seq_len=160)
    return family, ckpt, store, ref, model


def test_prefill_logits_match_transformers_fp32(family_setup):
    _, _, _, ref, model = family_setup
    for tokens in _prompts():
        ours = model(tokens, 0)
        assert ours.shape == (len(tokens), model.vocab_size)
        assert ours.dtype == torch.float32
        diff = (ours - ref_logits(ref, tokens)).abs().max().item()
        assert diff < ATOL_FP32, f"prompt of {len(tokens)} tokens: max |diff| {diff}"


def _greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    logits = model(prompt, 0)
    pos = len(prompt)
    out = []
    for _ in range(n):
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([nxt]), pos)
        pos += 1
    return out


def _ref_greedy(ref, prompt: torch.Tensor, n: int) -> list[int]:
    gc = copy.deepcopy(ref.generation_config)
    ids = prompt[None]
    out = ref.generate(
        ids, generation_config=gc, do_sample=False, max_new_tokens=n, min_new_tokens=0,
        eos_token_id=[], pad_token_id=4, attention_mask=torch.ones_like(ids),
    )
    return out[0, len(prompt):].tolist()


def test_greedy_32_tokens_identical_to_transformers_generate(family_setup):
    _, _, _, ref, model = family_setup
    seen: set[int] = set()
    for prompt in _prompts()[1:3]:
        expected = _ref_greedy(ref, prompt, 32)
        assert len(expected) == 32
        seen.update(expected)
        assert _greedy(model, prompt, 32) == expected
    assert len(seen) > 8, "degenerate reference: the test would prove little"


def test_chunked_prefill_and_decode_match_full_pass(family_setup):
    _, _, _, ref, model = family_setup
    tokens = _prompts()[3]  # 38 tokens
    expected = ref_logits(ref, tokens)
    pieces = []
    bounds = [0, 5, 6, 19, 30]
    for a, b in zip(bounds, bounds[1:], strict=False):
        pieces.append(model(tokens[a:b], a))
    for p in range(30, len(tokens)):  # token-by-token decode
        pieces.append(model(tokens[p : p + 1], p))
    ours = torch.cat(pieces)
    assert (ours - expected).abs().max().item() < ATOL_FP32


def test_rewind_overwrites_cache(family_setup):
    _, _, _, ref, model = family_setup
    a = _prompts()[3][:30]
    b = torch.arange(100, 112)
    model(a, 0)
    ours = model(b, 8)  # conversation rewound to position 8
    expected = ref_logits(ref, torch.cat([a[:8], b]))[8:]
    assert (ours - expected).abs().max().item() < ATOL_FP32
    # and decoding after the rewind continues from the new content
    nxt = torch.tensor([7])
    expected_next = ref_logits(ref, torch.cat([a[:8], b, nxt]))[-1]
    assert (model(nxt, 20)[0] - expected_next).abs().max().item() < ATOL_FP32


def test_bf16_within_stated_tolerance(family_setup):
    _, ckpt, store, ref, _ = family_setup
    model_bf16 = load_model(store, dtype=torch.bfloat16, max_seq_len=64)
    assert model_bf16.embed_tokens.weight.dtype == torch.bfloat16
    ref_bf16 = load_reference(ckpt, dtype=torch.bfloat16)
    tokens = _prompts()[3]
    fp32 = ref_logits(ref, tokens)
    tf_bf16 = ref_logits(ref_bf16, tokens)
    # prefill of all but the last 6 tokens, then token-by-token decode (both attention paths)
    n = len(tokens) - 6
    prefill_only = model_bf16(tokens, 0)
    assert (prefill_only - tf_bf16).abs().max().item() < BF16_PREFILL_ATOL_VS_TRANSFORMERS
    ours = torch.cat([model_bf16(tokens[:n], 0)] + [model_bf16(tokens[p : p + 1], p) for p in range(n, len(tokens))])
    assert ours.dtype == torch.float32
    assert (ours - tf_bf16).abs().max().item() < BF16_ATOL_VS_TRANSFORMERS
    our_err = (ours - fp32).abs().max().item()
    tf_err = (tf_bf16 - fp32).abs().max().item()
    assert our_err <= 1.25 * tf_err + BF16_SLACK, (our_err, tf_err)
    agree = (ours.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    tf_agree = (tf_bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree >= 0.85 and agree >= tf_agree - 0.05, (agree, tf_agree)
