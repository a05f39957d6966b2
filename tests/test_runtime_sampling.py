"""Sampling filters, repetition penalty, greedy and seeded reproducibility."""

import pytest
import torch

from engine.errors import MoeinfError
from engine.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_logit_bias,
    apply_openai_penalties,
    apply_repeat_penalty,
    candidates,
    min_p_size,
    nucleus_size,
)


def test_defaults_are_ollamas():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.9, 0.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.seed, p.num_predict, p.stop) == (1.1, 64, None, -1, ())


def test_from_options_validates_and_ignores_none():
    p = SamplingParams.from_options({"temperature": None, "top_k": 5, "stop": "END"})
    assert p.temperature == 0.8 and p.top_k == 5 and p.stop == ("END",)
    with pytest.raises(MoeinfError, match="unknown sampling option"):
        SamplingParams.from_options({"topk": 5})
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"min_p": -0.1}, {"repeat_penalty": 0}, {"repeat_last_n": -2}):
        with pytest.raises(MoeinfError):
            SamplingParams.from_options(bad)


def test_repeat_penalty_is_llama_cpp_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    out = apply_repeat_penalty(logits, [0, 1, 1, 4], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.25]  # positive divided, negative multiplied, once each
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]  # input untouched
    assert apply_repeat_penalty(logits, [0], 1.0) is logits


def test_top_k_candidates_are_the_k_largest_in_order():
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.5])
    values, ids = candidates(logits, 2)
    assert ids.tolist() == [1, 4] and values.tolist() == [3.0, 2.5]
    assert candidates(logits, 0)[1].tolist() == [1, 4, 2, 0, 3]  # off: everything, sorted
    assert candidates(logits, 99)[1].tolist() == [1, 4, 2, 0, 3]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    assert nucleus_size(probs, 0.7) == 2  # 0.5 then 0.3 reaches 0.8 >= 0.7
    assert nucleus_size(probs, 0.5) == 1  # exactly reached by the first: stops there
    assert nucleus_size(probs, 0.85) == 3
    assert nucleus_size(probs, 0.01) == 1  # always keeps the best token
    assert nucleus_size(probs, 1.0) == 4


def test_min_p_drops_relative_to_top():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert min_p_size(probs, 0.35) == 2  # threshold 0.175
    assert min_p_size(probs, 0.3) == 3  # 0.15 == 0.3 * 0.5 is kept
    assert min_p_size(probs, 0.0) == 4


def _logits(v=50, seed=0):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9, 0.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    assert s(logits, [1, 1]) == 1
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.1, repeat_last_n=2))
    assert s(logits, [1]) == 2  # 3.0 / 1.1 < 2.9
    assert s(logits, [1, 0, 3]) == 1  # token 1 is outside the last 2
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.1, repeat_last_n=0))
    assert s(logits, [1]) == 1  # 0 disables
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.1, repeat_last_n=-1))
    assert s(logits, [1, 0, 3]) == 2  # -1: whole history


def test_seed_reproducible_and_different_seeds_differ():
    logits = _logits()
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=42)
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a(logits, []) for _ in range(50)]
    seq_b = [b(logits, []) for _ in range(50)]
    assert seq_a == seq_b
    c = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=43))
    assert [c(logits, []) for _ in range(50)] != seq_a
    assert len(set(seq_a)) > 5  # actually random


def test_sampled_tokens_respect_filters():
    logits = _logits(seed=1)
    order = torch.argsort(logits, descending=True).tolist()
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, top_p=1.0, repeat_penalty=1.0, seed=0))
    assert {s(logits, []) for _ in range(300)} == set(order[:3])  # hot temperature: all three drawn
    # min_p at 0.9 after temperature 1: only tokens within 90% of the best
    probs = torch.softmax(logits, -1)
    allowed = set((probs >= 0.9 * probs.max()).nonzero().flatten().tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.9, repeat_penalty=1.0, seed=0))
    assert {s(logits, []) for _ in range(100)} <= allowed
    s = Sampler(SamplingParams(temperature=1.0, top_k=10, top_p=1.0, min_p=0.9, repeat_penalty=1.0, seed=0))
    assert {s(logits, []) for _ in range(100)} <= allowed


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    for top_k in (0, 4):
        s = Sampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=1.0, repeat_penalty=1.0, seed=1))
        counts = torch.bincount(torch.tensor([s(logits, []) for _ in range(4000)]), minlength=4).float() / 4000
        assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), counts
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, repeat_penalty=1.0, seed=1))
    counts = torch.bincount(torch.tensor([s(logits, []) for _ in range(4000)]), minlength=4).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03), counts  # renormalised nucleus


def test_temperature_sharpens_distribution():
    logits = _logits(seed=2)
    best = int(torch.argmax(logits))
    cold = Sampler(SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=3))
    hot = Sampler(SamplingParams(temperature=3.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=3))
    assert sum(cold(logits, []) == best for _ in range(200)) > 190
    assert sum(hot(logits, []) == best for _ in range(200)) < 100


def test_top_p_sampling_never_leaves_nucleus():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])
    probs = torch.softmax(logits, -1)  # ~0.73, 0.27, ...
    assert probs[0] < 0.8
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, repeat_penalty=1.0, seed=5))
    assert {s(logits, []) for _ in range(200)} == {0, 1}


def test_top_p_without_top_k_beyond_the_probe():
    logits = torch.zeros(4096)  # uniform: the nucleus of 0.5 is 2048 tokens, more than the 1024 probed first
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, repeat_penalty=1.0, seed=0))
    drawn = {s(logits, []) for _ in range(6000)}
    assert 1024 < len(drawn) <= 2048


def test_openai_penalties_count_only_generated_tokens():
    logits = torch.tensor([3.0, 2.9, 0.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0, frequency_penalty=0.2))
    assert s(logits, [1, 1, 1]) == 0  # the prompt's tokens are not penalised
    assert s(logits, [1, 1, 1, 0]) == 1  # 0 was generated once: 3.0 - 0.2 < 2.9
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0, presence_penalty=0.15))
    assert [s(logits, []) for _ in range(3)] == [0, 1, 0]  # presence: a flat 0.15 once a token appeared
    out = apply_openai_penalties(logits, {0: 3, 2: 1}, frequency=0.5, presence=1.0)
    assert out.tolist() == pytest.approx([3.0 - 1.5 - 1.0, 2.9, -1.5])


def test_logit_bias_shifts_tokens_and_is_validated():
    logits = torch.tensor([1.0, 0.0, -1.0])
    assert apply_logit_bias(logits, ((2, 5.0), (7, 1.0))).tolist() == [1.0, 0.0, 4.0]  # id 7: past the vocabulary
    s = Sampler(SamplingParams.from_options({"temperature": 0, "logit_bias": {"1": 100}}))
    assert s(logits, []) == 1
    with pytest.raises(MoeinfError, match="logit_bias"):
        SamplingParams.from_options({"logit_bias": {"x": 1}})
    with pytest.raises(MoeinfError, match="logit_bias"):
        SamplingParams.from_options({"logit_bias": {"-3": 1}})
