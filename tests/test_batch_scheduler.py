"""BatchScheduler (what a server drives): requests from several threads decode together, each stream
yields what Session.generate yields, a closed stream leaves the batch, a request joins mid-run."""

from __future__ import annotations

import threading

import pytest
from runtime_store import pull_tiny

import engine
from engine.errors import MoeinfError
from engine.runtime.batch_scheduler import BatchScheduler
from engine.runtime.stats import GenerationStats

GREEDY = dict(temperature=0, repeat_penalty=1.0)
PROMPTS = ["Hello there", "A longer question about the sea and its ships", "x", "Why?", "Tell me more"]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    _, model_dir, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("sched"), endless=True)
    return engine.load(model_dir, dtype="float32", ctx=96, expert_budget="100%")


def collect(items):
    pieces, stats = [], None
    for item in items:
        if isinstance(item, GenerationStats):
            stats = item
        else:
            assert isinstance(item, str) and item
            pieces.append(item)
    return "".join(pieces), stats


def test_threads_get_their_single_run_replies(session):
    want = []
    for i, p in enumerate(PROMPTS):
        session.reset()
        want.append(collect(session.generate(p, num_predict=6 + 2 * i, **GREEDY)))
    got: dict[int, tuple] = {}
    with BatchScheduler(session, max_batch=3) as sched:

        def client(i):
            got[i] = collect(sched.submit(PROMPTS[i], num_predict=6 + 2 * i, **GREEDY))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sched.running == 0 and sched.queued == 0
    for i, (text, stats) in enumerate(want):
        assert got[i][0] == text
        assert got[i][1].generated_tokens == stats.generated_tokens == 6 + 2 * i


def test_closed_stream_leaves_and_others_go_on(session):
    session.reset()
    want = collect(session.generate(PROMPTS[3], num_predict=8, **GREEDY))[0]
    with BatchScheduler(session, max_batch=2) as sched:
        long = sched.submit(PROMPTS[1], num_predict=80, **GREEDY)
        first = next(long)  # it is decoding
        assert isinstance(first, str)
        late = sched.submit(PROMPTS[3], num_predict=8, **GREEDY)  # joins the running batch
        long.close()  # a client that went away
        assert list(long) == []
        assert collect(late)[0] == want
        with pytest.raises(MoeinfError, match="unknown sampling"):
            sched.submit("x", bogus=1)
        with pytest.raises(MoeinfError, match="context holds"):
            sched.submit("word " * 200)
    with pytest.raises(MoeinfError, match="closed"):
        sched.submit("x")


def test_close_ends_unfinished_streams_with_an_error(session):
    sched = BatchScheduler(session, max_batch=1)
    s = sched.submit(PROMPTS[1], num_predict=80, **GREEDY)
    next(s)
    sched.close()
    with pytest.raises(MoeinfError, match="closed before"):
        list(s)
