"""Session: prompt rendering, generate loop, KV prefix reuse, early close, errors (fake model)."""

import json
import shutil

import pytest
import torch
from runtime_fakes import FakeLM
from tiny_models import make_tokenizer

from engine.errors import MoeinfError
from engine.runtime.session import Session
from engine.runtime.stats import GenerationStats
from engine.runtime.tokenizer import Tokenizer

GREEDY = dict(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "bos_token_id": 0}))
    return d


def make_session(tok_dir, ctx=256, banned=(1, 3), **kw):
    tok = Tokenizer(tok_dir)
    model = FakeLM(tok.vocab_size, ctx, banned=banned, **kw)
    return Session(model, tok, ctx=ctx, name="fake", prefill_chunk=kw.pop("chunk", 7))


def run(gen):
    pieces, stats = [], None
    for item in gen:
        if isinstance(item, GenerationStats):
            stats = item
        else:
            assert isinstance(item, str) and item
            pieces.append(item)
    return "".join(pieces), stats


def test_prompt_ids_use_template_system_and_raw(tok_dir):
    s = make_session(tok_dir)
    tok = s.tokenizer
    ids = s.prompt_ids("Hi", system="Be brief.")
    text = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok.encode(text)
    msgs = [{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"}]
    assert s.prompt_ids(msgs, system="ignored") == s.prompt_ids(msgs)
    assert s.prompt_ids("Hello there", raw=True) == [0] + tok.encode("Hello there")
    with pytest.raises(MoeinfError, match="raw mode"):
        s.prompt_ids(msgs, raw=True)


def test_no_template_falls_back_to_plain_text(tok_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tok_dir, d)
    (d / "chat_template.jinja").unlink()
    tok = Tokenizer(d)
    s = Session(FakeLM(tok.vocab_size, 64), tok, ctx=64)
    assert s.prompt_ids("Hello", system="Sys") == tok.encode("Sys\n\nHello", add_special_tokens=True)


def test_greedy_generation_matches_manual_loop(tok_dir):
    s = make_session(tok_dir)
    ids = s.prompt_ids("Why is the sky blue?")
    text, stats = run(s.generate("Why is the sky blue?", num_predict=12, **GREEDY))
    # the same greedy decode by hand on a fresh model, full-sequence each step (no cache reuse)
    ref = FakeLM(s.tokenizer.vocab_size, 256, banned=(1, 3))
    seq = list(ids)
    for _ in range(12):
        ref.cache.fill_(float("nan"))
        seq.append(int(ref.forward(torch.tensor(seq), 0)[-1].argmax()))
    assert text == s.tokenizer.decode(seq[len(ids):], skip_special_tokens=True)
    assert stats.prompt_tokens == len(ids) == stats.prompt_eval_count
    assert stats.generated_tokens == 12 and stats.done_reason == "length"
    assert stats.prompt_eval_s > 0 and stats.eval_s > 0 and stats.total_s >= stats.prompt_eval_s
    # prefill ran in chunks of 7, last chunk asked for the last logits only; decode one token per call
    prefill = [c for c in s.model.calls if len(c[0]) > 1 or c[1] < len(ids)]
    assert [c[1] for c in prefill] == list(range(0, len(ids), 7))
    assert s.cached_tokens == seq[:-1]  # the last sampled token was never run


def test_eos_stops_and_is_not_printed(tok_dir):
    s = make_session(tok_dir, banned=())
    tok = s.tokenizer
    eos_logit_model = s.model
    eos_logit_model.out[:, :] = 0
    eos_logit_model.out[:, 3] = 5.0  # <|im_end|> always wins
    text, stats = run(s.generate("Hi", **GREEDY))
    assert text == "" and stats.generated_tokens == 0 and stats.done_reason == "stop"
    assert 3 in tok.eos_ids


def test_stop_string_ends_generation_and_is_hidden(tok_dir):
    s = make_session(tok_dir)
    full, _ = run(s.generate("Tell me a story", num_predict=30, **GREEDY))
    assert len(full) > 6
    stop = full[3:6]
    s.reset()
    text, stats = run(s.generate("Tell me a story", num_predict=30, stop=[stop], **GREEDY))
    assert text == full[: full.index(stop)] and stop not in text
    assert stats.done_reason == "stop"


def test_context_full_stops_generation(tok_dir):
    s = make_session(tok_dir, ctx=40)
    n = len(s.prompt_ids("Hi"))
    _, stats = run(s.generate("Hi", **GREEDY))  # num_predict -1: until the context is full
    assert stats.done_reason == "length"
    assert stats.generated_tokens == 40 - n + 1  # ctx positions filled, plus the last sampled token
    assert len(s.cached_tokens) == 40


def test_prompt_longer_than_ctx_states_both_numbers(tok_dir):
    s = make_session(tok_dir, ctx=16)
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    n = len(s.prompt_ids(prompt))
    with pytest.raises(MoeinfError) as err:
        s.generate(prompt)
    assert str(n) in str(err.value) and "16" in str(err.value) and "--ctx" in str(err.value)
    assert "\n" not in str(err.value)


def _first_logits(model):
    """Record the logits row the sampler sees first (the last prompt position)."""
    seen = []
    orig = model.forward

    def spy(tokens, start_pos, last_only=False):
        out = orig(tokens, start_pos, last_only=last_only)
        seen.append(out[-1].clone())
        return out

    model.forward = spy
    return seen


def test_multi_turn_reuses_prefix_with_identical_logits(tok_dir):
    s = make_session(tok_dir)
    conv = [{"role": "user", "content": "Hi"}]
    reply, st1 = run(s.generate(conv, num_predict=8, system="Be brief.", **GREEDY))
    conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    seen = _first_logits(s.model)
    text2, st2 = run(s.generate(conv, num_predict=8, system="Be brief.", **GREEDY))
    assert st2.prompt_tokens > st1.prompt_tokens
    assert 0 < st2.prompt_eval_count < st2.prompt_tokens - st1.prompt_tokens + 8  # only the new suffix ran
    assert st2.load_s == 0.0

    fresh = make_session(tok_dir)
    seen_fresh = _first_logits(fresh.model)
    text_fresh, st_fresh = run(fresh.generate(conv, num_predict=8, system="Be brief.", **GREEDY))
    assert st_fresh.prompt_eval_count == st_fresh.prompt_tokens
    assert text2 == text_fresh
    # the logits the first reply token was sampled from: after the last prefill chunk of each run
    prefill_logits = seen[-8]  # 7 decode calls follow (8th token not run)
    fresh_prefill = seen_fresh[-8]
    assert len(seen) == -(-st2.prompt_eval_count // 7) + 7
    assert torch.allclose(prefill_logits, fresh_prefill, atol=1e-5)
    assert torch.allclose(s.logits(fresh.cached_tokens), fresh.logits(fresh.cached_tokens), atol=1e-6)


def test_same_prompt_twice_reruns_only_last_token(tok_dir):
    s = make_session(tok_dir)
    a, _ = run(s.generate("Hi", num_predict=5, **GREEDY))
    b, st = run(s.generate("Hi", num_predict=5, **GREEDY))
    assert a == b and st.prompt_eval_count == 1


def test_closing_generator_early_leaves_session_consistent(tok_dir):
    s = make_session(tok_dir)
    gen = s.generate("Tell me a story about a robot", num_predict=20, **GREEDY)
    got = [next(gen) for _ in range(3)]
    assert all(isinstance(g, str) for g in got)
    gen.close()
    prompt = s.prompt_ids("Tell me a story about a robot")
    cached = s.cached_tokens
    assert cached[: len(prompt)] == prompt and len(cached) > len(prompt)
    # the cache really holds what the session says: its logits equal a fresh run's
    fresh = make_session(tok_dir)
    conv = [{"role": "user", "content": "Hi"}]
    t1, _ = run(s.generate(conv, num_predict=6, **GREEDY))
    t2, _ = run(fresh.generate(conv, num_predict=6, **GREEDY))
    assert t1 == t2


def test_keyboard_interrupt_mid_forward_leaves_session_consistent(tok_dir):
    s = make_session(tok_dir, interrupt_on_call=9)  # during decode (prefill takes ~5 calls)
    gen = s.generate("Tell me a story about a robot and a cat", num_predict=20, **GREEDY)
    with pytest.raises(KeyboardInterrupt):
        for _ in gen:
            pass
    n = len(s.cached_tokens)
    assert not torch.isnan(s.model.cache[:n]).any()
    s.model.interrupt_on_call = None
    fresh = make_session(tok_dir)
    a, _ = run(s.generate("Tell me a story about a robot and a dog", num_predict=6, **GREEDY))
    b, _ = run(fresh.generate("Tell me a story about a robot and a dog", num_predict=6, **GREEDY))
    assert a == b


def test_interrupt_during_prefill(tok_dir):
    s = make_session(tok_dir, interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        run(s.generate("The quick brown fox jumps over the lazy dog again and again", **GREEDY))
    assert len(s.cached_tokens) == 7  # the first chunk only
    s.model.interrupt_on_call = None
    fresh = make_session(tok_dir)
    p = "The quick brown fox jumps over the lazy dog again and again"
    assert run(s.generate(p, num_predict=5, **GREEDY))[0] == run(fresh.generate(p, num_predict=5, **GREEDY))[0]


def test_superseded_generator_refuses_to_continue(tok_dir):
    s = make_session(tok_dir)
    old = s.generate("Hi", num_predict=20, **GREEDY)
    next(old)
    run(s.generate("Hello", num_predict=3, **GREEDY))
    with pytest.raises(MoeinfError, match="superseded"):
        next(old)


def test_seeded_sampling_is_reproducible(tok_dir):
    s = make_session(tok_dir)
    a, _ = run(s.generate("Hi", num_predict=15, seed=7, temperature=1.0))
    b, _ = run(s.generate("Hi", num_predict=15, seed=7, temperature=1.0))
    c, _ = run(s.generate("Hi", num_predict=15, seed=8, temperature=1.0))
    assert a == b and a != c


def test_bad_option_and_info_and_reset(tok_dir):
    s = make_session(tok_dir)
    with pytest.raises(MoeinfError, match="unknown sampling option"):
        s.generate("Hi", top_kk=3)
    run(s.generate("Hi", num_predict=2, **GREEDY))
    info = s.info()
    assert info["ctx"] == 256 and info["tokens_in_cache"] > 0 and info["chat_template"] is True
    assert info["eos_ids"] == [1, 3]
    s.reset()
    assert s.info()["tokens_in_cache"] == 0
    _, st = run(s.generate("Hi", num_predict=2, **GREEDY))
    assert st.prompt_eval_count == st.prompt_tokens


def test_generator_does_not_leave_inference_mode_on(tok_dir):
    s = make_session(tok_dir)
    gen = s.generate("Hi", num_predict=5, **GREEDY)
    next(gen)
    assert not torch.is_inference_mode_enabled()
    gen.close()
    out = s.logits(s.prompt_ids("Hi"))
    assert not out.is_inference()


class _Recorder:
    def __init__(self):
        self.events = []

    def begin_sequence(self):
        self.events.append("begin")

    def end_sequence(self):
        self.events.append("end")


def test_each_generation_is_one_traced_sequence(tok_dir):
    s = make_session(tok_dir)
    s.recorder = rec = _Recorder()
    run(s.generate("Hi", num_predict=3, **GREEDY))
    gen = s.generate("Hello", num_predict=30, **GREEDY)
    next(gen)
    gen.close()  # an early stop still ends the sequence
    assert rec.events == ["begin", "end", "begin", "end"]
    old = s.generate("Hi", num_predict=30, **GREEDY)
    next(old)
    run(s.generate("Hello", num_predict=2, **GREEDY))
    old.close()  # superseded: its sequence was ended when the newer one began, not again now
    assert rec.events[4:] == ["begin", "end", "begin", "end"]
