"""`moeinf serve`'s OpenAI routes, driven over HTTP by the official `openai` client against a real
uvicorn server on a tiny model: answers equal the session's own greedy run, streaming equals
non-streaming, usage, stop sequences, seeds, errors in OpenAI's shape, the API key, a full queue,
the loading state, concurrent clients, a client that disconnects, and the metrics."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from runtime_store import pull_tiny
from serve_testlib import ThreadServer

import engine
from engine.serve.state import ServeSettings

CTX = 1024
MAX_BODY = 64 * 1024
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
HI = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        home, root, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("serve"), name="tiny", endless=True)
        mp.setenv("MOEINF_HOME", str(home))
        yield root


def _load(root):
    return lambda: engine.load(root, device="cpu", ctx=CTX)


PACE_S = 0.02  # per piece: a 1024-token context takes over 20 s however fast the machine (a loaded one
# set up the queue test's four clients in over 5 s once: the long one ended first)


def _paced(root):
    """A session whose stream waits ``PACE_S`` per piece, so that the tests of a long generation
    (a client that gives up, the queue's turns) see it still running on a fast machine."""

    def load():
        session = engine.load(root, device="cpu", ctx=CTX)
        generate_ids = session.generate_ids

        def paced(ids, **sampling):
            inner = generate_ids(ids, **sampling)  # errors in the prompt raise here, as unpaced
            return _pace(inner)

        def _pace(inner):
            try:
                for item in inner:
                    time.sleep(PACE_S)
                    yield item
            finally:
                inner.close()  # a cancelled job closes its generation, KV cache consistent

        session.generate_ids = paced
        return session

    return load


@pytest.fixture(scope="module")
def srv(store):
    with ThreadServer(ServeSettings("tiny", max_body_bytes=MAX_BODY), _paced(store)) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(store):
    return engine.load(store, device="cpu", ctx=CTX)


def greedy(session, prompt, n, raw=False):
    return "".join(
        p for p in session.generate(prompt, raw=raw, num_predict=n, **GREEDY) if isinstance(p, str)
    )


def chat(client, messages=HI, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "moeinf"


def test_chat_answer_is_the_sessions_greedy_answer(client, reference):
    r = chat(client, max_tokens=12)
    assert r.choices[0].message.content == greedy(reference, HI, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(reference.prompt_ids(HI))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming_and_ends_with_usage(client):
    whole = chat(client, max_tokens=10).choices[0].message.content
    chunks = list(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_resent_conversation_reuses_the_kv_prefix(client):
    first = chat(client, max_tokens=6)
    turn = [
        *HI,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And at night?"},
    ]
    second = chat(client, messages=turn, max_tokens=6)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_completions_raw_prompt_streaming_and_not(client, reference):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy(reference, "Once upon a time", 8, raw=True)
    streamed = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    default_length = client.completions.create(model="tiny", prompt="Hi", temperature=0)
    assert default_length.usage.completion_tokens == 16  # OpenAI's max_tokens default for completions


def test_stop_sequence_cuts_the_answer(client):
    full = chat(client, max_tokens=16).choices[0].message.content
    stop = full[5:8]
    assert stop and stop in full
    r = chat(client, max_tokens=16, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    a = chat(client, temperature=1.0, seed=1234, max_tokens=16).choices[0].message.content
    b = chat(client, temperature=1.0, seed=1234, max_tokens=16).choices[0].message.content
    assert a == b


def test_logit_bias_forces_a_token(client, reference):
    token = reference.tokenizer.encode(" blue")[0]
    r = chat(client, max_tokens=4, logit_bias={str(token): 100})
    assert r.choices[0].message.content == reference.tokenizer.decode([token] * 4)


def test_bad_requests_get_openai_errors(client, srv):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=HI)
    assert err.value.body["code"] == "model_not_found" and "tiny" in err.value.body["message"]
    cases = [
        (dict(temperature=5), "temperature"),
        (dict(n=2), "n"),
        (dict(logprobs=True), "logprobs"),
        (
            dict(tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
            "tool_choice",
        ),
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, **kwargs)
        body = err.value.body
        assert body["type"] == "invalid_request_error" and body["param"] == param, (kwargs, body)
        assert body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": "sky " * (CTX + 10)}])
    assert err.value.body["code"] == "context_length_exceeded"
    assert f"the context holds {CTX}" in err.value.body["message"]
    bad_json = httpx.post(
        srv.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    too_big = httpx.post(
        srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI, "x": "a" * MAX_BODY}
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    unknown = httpx.get(srv.url + "/v1/nothing")
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_four_concurrent_clients_each_get_their_own_answer(client, reference):
    prompts = [
        [{"role": "user", "content": q}]
        for q in ("Why is the sky blue?", "Tell me a story about a robot", "Name the days", "What is 1 2 3?")
    ]
    expected = [greedy(reference, p, 24) for p in prompts]
    assert len(set(expected)) == 4
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = chat(client, messages=prompts[i], max_tokens=24, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(4)] == expected


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.split(" ")[-1])
    return total


def _wait_metric(url: str, name: str, value: float, timeout: float = 30) -> bool:
    """Whether the metric reaches ``value`` (the handler counts a cancel just after the worker stopped)."""
    deadline = time.monotonic() + timeout
    while _metric(url, name) != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return _metric(url, name) == value


def test_disconnect_mid_stream_cancels_the_generation(srv, client):
    cancelled = _metric(srv.url, 'moeinf_generations_total{reason="cancelled"}')
    body = {"model": "tiny", "messages": HI, "max_tokens": 100000, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    # the connection is closed: the generation stops long before its 100000 tokens or the full context
    srv.wait_idle()
    assert len(srv.state.session.cached_tokens) < CTX // 2
    assert _wait_metric(srv.url, 'moeinf_generations_total{reason="cancelled"}', cancelled + 1)
    assert chat(client, max_tokens=3).usage.completion_tokens == 3  # the server serves the next one


def test_metrics_count_requests_and_tokens(srv, client):
    before = _metric(srv.url, "moeinf_generated_tokens_total")
    requests = _metric(srv.url, 'moeinf_requests_total{route="/v1/chat/completions",status="200"}')
    chat(client, max_tokens=5)
    assert _metric(srv.url, "moeinf_generated_tokens_total") == before + 5
    assert _wait_metric(
        srv.url, 'moeinf_requests_total{route="/v1/chat/completions",status="200"}', requests + 1
    )
    text = httpx.get(srv.url + "/metrics").text
    for name in (
        "moeinf_time_to_first_token_seconds_count",
        "moeinf_decode_tokens_per_second_count",
        "moeinf_expert_cache_hit_ratio",
        "moeinf_expert_loads_total",
        "moeinf_expert_bytes_loaded_total",
        "moeinf_expert_stall_seconds_total",
        "moeinf_queue_waiting",
        "moeinf_model_loaded 1.0",
    ):
        assert name in text, name


def test_health_answers_ok_once_loaded(srv):
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny"}


def test_api_key_and_a_full_queue(store):
    settings = ServeSettings("tiny", api_key="s3cret", max_queue=0)
    with ThreadServer(settings, _load(store)) as server:
        assert httpx.get(server.url + "/health").status_code == 200  # open without the key
        with pytest.raises(openai.AuthenticationError) as err:
            chat(openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0))
        assert err.value.body["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert chat(good, max_tokens=2).usage.completion_tokens == 2
        # one request generating, none may wait: the next gets 503 with Retry-After
        body = {"model": "tiny", "messages": HI, "max_tokens": 100000, "temperature": 0, "stream": True}
        headers = {"Authorization": "Bearer s3cret"}
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            with pytest.raises(openai.APIStatusError) as busy:
                chat(good, max_tokens=2)
            assert busy.value.status_code == 503
            assert busy.value.response.headers["Retry-After"] == "1"
            assert busy.value.body["code"] == "server_busy"


def test_loading_answers_503_until_the_model_is_ready(store):
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return engine.load(store, device="cpu", ctx=CTX)

    with ThreadServer(ServeSettings("tiny"), slow_load, wait_loaded=False) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HI})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["Retry-After"] == "1"
        gate.set()
        assert server.state.wait_loaded(60)
        assert httpx.get(server.url + "/health").status_code == 200


def test_access_log_is_one_json_line_per_request(srv, client, caplog):
    def logged() -> list[dict]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "moeinf.access"]
        return [entry for entry in lines if entry["request_id"] == "req-42"]

    with caplog.at_level("INFO", logger="moeinf.access"):
        r = chat(client, max_tokens=3, extra_headers={"X-Request-ID": "req-42"})
        deadline = time.monotonic() + 30  # the line is written once the response is sent
        while not logged() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert r._request_id == "req-42"  # echoed back as X-Request-ID
    (line,) = logged()
    assert line["path"] == "/v1/chat/completions" and line["status"] == 200 and line["method"] == "POST"
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 0 and line["duration_s"] >= 0


def test_cache_prompt_false_prefills_everything_with_the_same_answer(client):
    first = chat(client, max_tokens=6)
    again = chat(client, max_tokens=6)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    cold = chat(client, max_tokens=6, extra_body={"cache_prompt": False})
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == first.choices[0].message.content


def test_a_non_streaming_client_that_gives_up_cancels_too(srv, client):
    cancelled = _metric(srv.url, 'moeinf_generations_total{reason="cancelled"}')
    body = {"model": "tiny", "messages": HI, "max_tokens": 100000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    srv.wait_idle()
    assert _wait_metric(srv.url, 'moeinf_generations_total{reason="cancelled"}', cancelled + 1)
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


def test_a_model_that_fails_to_load_stops_the_server(store):
    from engine.errors import MoeinfError

    def broken():
        raise MoeinfError("the store model is damaged; pull it again")

    server = ThreadServer(ServeSettings("tiny"), broken, wait_loaded=False)
    with server:
        server._thread.join(60)  # the server stops itself once the load failed
        assert not server._thread.is_alive()
    assert server.state.load_error == "the store model is damaged; pull it again"
    from engine.serve.errors import ApiError

    with pytest.raises(ApiError) as err:
        server.state.ready_session()
    assert err.value.status == 503 and "damaged" in err.value.message


def test_the_queue_takes_turns_between_clients(srv, client):
    long = {"model": "tiny", "messages": HI, "max_tokens": 100000, "temperature": 0, "stream": True}
    done: list[str] = []

    def ask(user: str, tag: str) -> None:
        chat(client, max_tokens=2, user=user)
        done.append(tag)

    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the long one is queued (its first line comes at once) ...
        deadline = time.monotonic() + 30
        while srv.state.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # ... and runs once the last test's job has left the worker: the others wait
        threads = []
        for user, tag in (("alice", "a1"), ("alice", "a2"), ("alice", "a3"), ("bob", "b1")):
            waiting = srv.state.scheduler.waiting
            threads.append(threading.Thread(target=ask, args=(user, tag)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while srv.state.scheduler.waiting == waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.state.scheduler.running == 1 and srv.state.scheduler.waiting == waiting + 1
    for t in threads:
        t.join(60)
    assert done == ["a1", "b1", "a2", "a3"]  # bob's one request does not wait for all of alice's
