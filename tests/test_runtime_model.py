"""Session on real tiny models pulled into the store: same tokens and logits as transformers, KV
prefix reuse equals a fresh run, early stops leave the session consistent."""

import pytest
import torch
from runtime_store import pull_tiny
from tiny_models import load_reference

import engine
from engine.errors import MoeinfError
from engine.runtime.stats import GenerationStats

GREEDY = dict(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module", params=["mixtral"])
def tiny(request, tmp_path_factory):
    home, root, ckpt = pull_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return root, load_reference(ckpt)


def collect(gen):
    items = list(gen)
    assert isinstance(items[-1], GenerationStats)
    return "".join(items[:-1]), items[-1]


def test_greedy_tokens_match_transformers_generate(tiny):
    root, ref = tiny
    s = engine.load(root, ctx=256)
    prompt = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = s.prompt_ids(prompt, system="Be brief.")
    text, stats = collect(s.generate(prompt, system="Be brief.", num_predict=24, **GREEDY))
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                            eos_token_id=None, pad_token_id=4)[0, len(ids):].tolist()
    eos = set(s.tokenizer.eos_ids)
    if any(t in eos for t in want):
        want = want[: min(i for i, t in enumerate(want) if t in eos)]
    got = s.cached_tokens[len(ids):]
    assert got == want[: len(got)] and len(got) >= len(want) - 1
    assert text == s.tokenizer.decode(want, skip_special_tokens=True)
    assert stats.prompt_tokens == len(ids) and stats.generated_tokens == len(want)
    assert torch.allclose(s.logits(ids), ref(torch.tensor([ids])).logits[0].float(), atol=1e-4)
    assert s.info()["parameters"] == sum(p.numel() for p in ref.parameters())


def test_multi_turn_prefix_reuse_equals_fresh_run(tiny):
    root, _ = tiny
    s = engine.load(root, ctx=256)
    conv = [{"role": "user", "content": "Hi!"}]
    reply, first = collect(s.generate(conv, num_predict=10, **GREEDY))
    conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me a story."}]
    text, second = collect(s.generate(conv, num_predict=10, **GREEDY))
    assert second.prompt_eval_count < second.prompt_tokens  # the shared prefix was not run again
    assert second.cached_tokens >= first.prompt_tokens

    fresh = engine.load(root, ctx=256)
    text_fresh, st = collect(fresh.generate(conv, num_predict=10, **GREEDY))
    assert st.prompt_eval_count == st.prompt_tokens
    assert text == text_fresh
    ids = s.cached_tokens
    assert ids == fresh.cached_tokens
    # logits of the reused cache (next token after the cached ids) equal a fresh full run
    reused = s._forward([ids[-1]], len(ids) - 1)[-1]  # rerun the last position against the reused cache
    assert torch.allclose(reused, fresh.logits(ids)[-1], atol=1e-5)


def test_generator_closed_early_then_continue(tiny):
    root, _ = tiny
    s = engine.load(root, ctx=256)
    gen = s.generate("Once upon a time", num_predict=30, **GREEDY)
    next(gen)
    next(gen)
    gen.close()
    conv = [{"role": "user", "content": "The capital of France"}]
    a, _ = collect(s.generate(conv, num_predict=8, **GREEDY))
    b, _ = collect(engine.load(root, ctx=256).generate(conv, num_predict=8, **GREEDY))
    assert a == b


def test_load_errors(tiny):
    root, _ = tiny
    with pytest.raises(MoeinfError, match="moeinf pull"):
        engine.load("no-such-model")
    if not torch.cuda.is_available():
        with pytest.raises(MoeinfError, match="CUDA is not available"):
            engine.load(root, device="cuda")
    with pytest.raises(MoeinfError, match="unknown dtype"):
        engine.load(root, dtype="float8")
    s = engine.load(root, ctx=8)
    with pytest.raises(MoeinfError, match=r"prompt is \d+ tokens but the context holds 8"):
        s.generate("The quick brown fox jumps over the lazy dog")
    info = s.info()
    assert info["family"] == root.name.removeprefix("tiny-") and info["ctx"] == 8


def test_long_prompt_prefills_in_chunks_like_one_pass(tiny):
    root, ref = tiny
    s = engine.load(root, ctx=1024)
    prompt = "The quick brown fox jumps over the lazy dog. Why is the sky blue? " * 20
    ids = s.prompt_ids(prompt, raw=True)
    assert 512 < len(ids) < 1000  # more than one prefill chunk
    text, stats = collect(s.generate(prompt, raw=True, num_predict=6, **GREEDY))
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=4)[0, len(ids):].tolist()
    got = s.cached_tokens[len(ids):]
    assert stats.prompt_eval_count == len(ids)
    assert got == want[: len(got)] and len(got) == 5
