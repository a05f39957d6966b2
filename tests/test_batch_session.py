"""BatchSession (continuous batching): every request's reply in a batch is the reply it gets alone
(several families incl. DeepSeek MLA and gpt-oss, mixed prompt lengths, requests joining while others
decode, one ending early while the rest go on, cancel), and the expert source sees one request per
distinct expert per layer and step, whatever the batch size."""

from __future__ import annotations

import pytest
from runtime_store import pull_tiny

import engine
from engine.errors import MoeinfError
from engine.runtime.batch import BatchSession
from engine.runtime.stats import GenerationStats

PROMPTS = [
    "Hi",
    "Tell me a long story about the sea and the ships that sail on it",
    "abc",
    "What is two plus two? Answer with care.",
    "One more prompt of a middling length",
]
GREEDY = dict(temperature=0, repeat_penalty=1.0)


def alone(session, prompt, **opts):
    session.reset()
    pieces, stats = [], None
    for item in session.generate(prompt, **GREEDY, **opts):
        if isinstance(item, GenerationStats):
            stats = item
        else:
            pieces.append(item)
    return "".join(pieces), stats


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"])
def session(request, tmp_path_factory):
    home, model_dir, _ = pull_tiny(request.param, tmp_path_factory.mktemp(request.param), endless=True)
    s = engine.load(model_dir, dtype="float32", ctx=96, expert_budget="100%")
    yield s


def test_batch_replies_equal_single_runs(session):
    limits = [12, 20, 3, 16, 9]  # the third ends early while the others go on
    want = [alone(session, p, num_predict=n) for p, n in zip(PROMPTS, limits, strict=True)]
    with BatchSession(session, max_batch=3, prefill_chunk=16) as batch:  # 5 requests, 3 slots: two wait
        reqs = [batch.submit(p, num_predict=n, **GREEDY) for p, n in zip(PROMPTS, limits, strict=True)]
        finished = {}
        streamed = {r.id: "" for r in reqs}
        for ev in batch.run():
            streamed[ev.request.id] += ev.text
            if ev.stats is not None:
                finished[ev.request.id] = ev.stats
                assert len(batch.running) <= 3
    for r, (text, stats) in zip(reqs, want, strict=True):
        assert r.response == text
        assert streamed[r.id] == text
        got = finished[r.id]
        assert (got.generated_tokens, got.done_reason, got.prompt_tokens) == (
            stats.generated_tokens,
            stats.done_reason,
            stats.prompt_tokens,
        )
    assert reqs[2].finished_at < reqs[1].finished_at
    # the session works alone again afterwards
    assert alone(session, PROMPTS[0], num_predict=12)[0] == want[0][0]


def test_join_mid_run_and_cancel(session):
    want = alone(session, PROMPTS[3], num_predict=10)[0]
    with BatchSession(session, max_batch=4) as batch:
        first = batch.submit(PROMPTS[1], num_predict=30, **GREEDY)
        for _ in range(3):
            batch.step()
        late = batch.submit(PROMPTS[3], num_predict=10, **GREEDY)  # joins while the first decodes
        batch.step()
        ev = batch.cancel(first)
        assert ev is not None and ev.stats.done_reason == "cancel" and first.done
        assert batch.cancel(first) is None
        list(batch.run())
    assert late.response == want and late.stats.done_reason == "length"


def test_submit_errors(session):
    with BatchSession(session, max_batch=2) as batch:
        with pytest.raises(MoeinfError, match="unknown sampling"):
            batch.submit("x", bogus=1)
        with pytest.raises(MoeinfError, match="context holds"):
            batch.submit("word " * 200)
    with pytest.raises(MoeinfError, match="closed"):
        batch.submit("x")


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_one_expert_request_per_layer_and_step_whatever_the_batch(tmp_path, batch_size):
    """Under a budget, each MoE layer of each step asks the cache once for each distinct expert its
    tokens routed to, and the loader loads each at most once in that layer-step, at any batch size."""
    home, model_dir, _ = pull_tiny("mixtral", tmp_path, endless=True)
    s = engine.load(model_dir, dtype="float32", ctx=64, expert_budget="50%", policy="lru")
    src = s.experts
    calls = []  # (layer, routed ids of the step's tokens, ids fetched, keys loaded)
    observe, fetch, submit = src.observe, src.fetch, src.loader.submit

    def spy_observe(layer, topk_ids, hidden):
        calls.append([layer, sorted(set(topk_ids.reshape(-1).tolist())), None, []])
        return observe(layer, topk_ids, hidden)

    def spy_fetch(layer, ids):
        calls[-1][2] = list(ids)
        yield from fetch(layer, ids)

    def spy_submit(key, priority, *a, **kw):
        if calls and kw.get("kind") in ("demand", "stream"):
            calls[-1][3].append(key)
        return submit(key, priority, *a, **kw)

    src.observe, src.fetch, src.loader.submit = spy_observe, spy_fetch, spy_submit
    before = src.stats()
    with BatchSession(s, max_batch=batch_size) as batch:
        for p in PROMPTS[:batch_size]:
            batch.submit(p, num_predict=6, **GREEDY)
        list(batch.run())
        steps = batch.steps
    after = src.stats()
    assert calls and len(calls) == 2 * steps  # two MoE layers, one observe + one fetch each a step
    for layer, routed, fetched, loaded in calls:
        assert fetched is not None and sorted(fetched) == routed and len(fetched) == len(set(fetched))
        assert len(loaded) == len(set(loaded)) and {e for _, e in loaded} <= set(routed)
        assert all(k[0] == layer for k in loaded)
    assert after.accesses - before.accesses == sum(len(c[1]) for c in calls)
    assert sum(len(c[3]) for c in calls) > 0  # the budget made it load
    s.experts.close()
