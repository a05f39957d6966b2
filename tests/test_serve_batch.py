"""`moeinf serve --batch-size N`: concurrent requests are decoded together in the same batch steps
(continuous batching on the runtime's BatchScheduler), and each answer equals its own single-request
greedy run (fp32 tiny model); a request that leaves frees its place; the batch's metrics."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import pytest
from runtime_store import pull_tiny
from serve_testlib import ThreadServer

import engine
from engine.errors import MoeinfError
from engine.serve.scheduler import Job, Scheduler
from engine.serve.state import ServeSettings

CTX = 256
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
PROMPTS = ["Why is the sky blue?", "Tell me about the sea and its many ships"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home, root, _ = pull_tiny(
            "mixtral", tmp_path_factory.mktemp("serve-batch"), name="tiny", endless=True
        )
        mp.setenv("MOEINF_HOME", str(home))
        yield root


def _load(root):
    return lambda: engine.load(root, device="cpu", dtype="float32", ctx=CTX)


@pytest.fixture(scope="module")
def reference(store):
    return _load(store)()


def greedy(session, messages, n):
    session.reset()
    return "".join(p for p in session.generate(messages, num_predict=n, **GREEDY) if isinstance(p, str))


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def test_two_waiting_jobs_decode_in_the_same_steps_each_as_alone(store, reference):
    want = [greedy(reference, chat(p), 12) for p in PROMPTS]
    session = _load(store)()
    sched = Scheduler(max_queue=4, batch_size=2)

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [
            sched.submit(Job(session.prompt_ids(chat(p)), {"num_predict": 12, **GREEDY}, loop))
            for p in PROMPTS
        ]
        sched.start(session)  # both wait already: they join the batch together
        texts = []
        for job in jobs:
            texts.append("".join([p async for p in job.stream() if isinstance(p, str)]))
        return texts, jobs

    try:
        texts, jobs = asyncio.run(main())
        steps, sequence_steps, peak = sched.batch_stats()
    finally:
        sched.stop(timeout=30)
        session.close()
    assert texts == want
    assert [j.stats.generated_tokens for j in jobs] == [12, 12]
    assert [j.stats.done_reason for j in jobs] == ["length", "length"]
    assert peak == 2 and sequence_steps > steps  # the two sequences shared forward passes
    assert sched.running == 0


def test_batch_size_below_one_is_refused():
    with pytest.raises(MoeinfError, match="--batch-size"):
        Scheduler(max_queue=4, batch_size=0)


def _metric(body: str, name: str) -> float:
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", body, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_a_request_joins_a_running_stream_over_http(store, reference):
    short_want = greedy(reference, chat(PROMPTS[1]), 8)
    long_want = greedy(reference, chat(PROMPTS[0]), 200)
    long = {"model": "tiny", "messages": chat(PROMPTS[0]), "max_tokens": 200, "stream": True, **GREEDY}
    short = {"model": "tiny", "messages": chat(PROMPTS[1]), "max_tokens": 8, **GREEDY}
    with ThreadServer(ServeSettings("tiny", batch_size=2), _load(store)) as srv:
        got: dict[str, str] = {}

        def ask_short() -> None:
            r = httpx.post(srv.url + "/v1/chat/completions", json=short, timeout=60)
            got["short"] = r.json()["choices"][0]["message"]["content"]

        pieces = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        pieces.append(delta)
                        if len(pieces) == 1:  # the long one runs: the short one joins its batch
                            thread = threading.Thread(target=ask_short)
                            thread.start()
        thread.join(60)
        srv.wait_idle()
        body = httpx.get(srv.url + "/metrics").text
    assert got["short"] == short_want
    assert "".join(pieces) == long_want
    assert _metric(body, "moeinf_batch_size_peak") == 2
    assert _metric(body, "moeinf_batch_sequence_steps") > _metric(body, "moeinf_batch_steps")
