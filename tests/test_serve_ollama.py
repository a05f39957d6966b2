"""`moeinf serve`'s Ollama routes with the official `ollama` client, and tool calls on both APIs.

The tiny model here has a chat template that takes ``tools`` (Hermes/Qwen style) and a tokenizer whose
added token 4 spells a whole ``<tool_call>...</tool_call>`` block, so a request can force the model to
call a tool (``logit_bias`` on that token) and the server must hand the call back as structured
``tool_calls``."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from runtime_store import make_endless
from serve_testlib import ThreadServer
from tiny_models import make_tiny_checkpoint

import engine
from engine.serve.state import ServeSettings

CTX = 1024
TOOL_TOKEN = 4  # <pad> in the tiny tokenizer, rewritten below
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TOOL_TEXT = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    '{% for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n'
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HI = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


def _tool_checkpoint(out):
    ckpt = make_tiny_checkpoint("qwen3_moe", out)
    make_endless(ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["id"] == TOOL_TOKEN:
            added.update(content=TOOL_TEXT, special=False)
    vocab = tok["model"]["vocab"]
    vocab[TOOL_TEXT] = vocab.pop("<pad>")
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    if str(TOOL_TOKEN) in config.get("added_tokens_decoder", {}):
        config["added_tokens_decoder"][str(TOOL_TOKEN)].update(content=TOOL_TEXT, special=False)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return ckpt


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from engine.store.pull import pull_model

    base = tmp_path_factory.mktemp("serve-ollama")
    ckpt = _tool_checkpoint(base / "ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEINF_HOME", str(base / "home"))
        pull_model(str(ckpt), name="tools")
        yield base / "home" / "models" / "tools"


@pytest.fixture(scope="module")
def srv(store):
    load = lambda: engine.load(store, device="cpu", ctx=CTX)  # noqa: E731
    with ThreadServer(ServeSettings("tools"), load) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return ollama.Client(host=srv.url)


@pytest.fixture(scope="module")
def reference(store):
    return engine.load(store, device="cpu", ctx=CTX)


def greedy(session, prompt, n, raw=False, system=None):
    pieces = session.generate(prompt, raw=raw, system=system, num_predict=n, **GREEDY)
    return "".join(p for p in pieces if isinstance(p, str))


def test_the_tokenizer_spells_the_tool_call(reference):
    assert reference.tokenizer.decode([TOOL_TOKEN]) == TOOL_TEXT


def test_chat_matches_the_session_and_reports_ollamas_fields(client, reference):
    r = client.chat(model="tools", messages=HI, options={**GREEDY, "num_predict": 10}, stream=False)
    assert r.message.role == "assistant" and r.message.content == greedy(reference, HI, 10)
    assert r.done and r.done_reason == "length" and r.eval_count == 10
    assert r.prompt_eval_count == len(reference.prompt_ids(HI))
    assert r.total_duration > 0 and r.eval_duration > 0 and r.prompt_eval_duration > 0


def test_chat_streams_ndjson(client):
    whole = client.chat(model="tools", messages=HI, options={**GREEDY, "num_predict": 8}, stream=False)
    parts = list(client.chat(model="tools", messages=HI, options={**GREEDY, "num_predict": 8}, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 8


def test_ollama_defaults_differ_from_openais(srv, client):
    # Ollama's repeat penalty (1.1) applies unless options say otherwise; OpenAI's routes have none
    greedy_only = client.chat(model="tools", messages=HI, options={"temperature": 0, "num_predict": 24})
    plain = client.chat(model="tools", messages=HI, options={**GREEDY, "num_predict": 24})
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    openai_greedy = oa.chat.completions.create(model="tools", messages=HI, max_tokens=24, temperature=0)
    assert openai_greedy.choices[0].message.content == plain.message.content
    assert greedy_only.message.content != plain.message.content


def test_generate_with_system_and_raw(client, reference):
    r = client.generate(
        model="tools", prompt="Tell me a story", system="Be brief.", options={**GREEDY, "num_predict": 8}
    )
    assert r.response == greedy(reference, "Tell me a story", 8, system="Be brief.") and r.done
    raw = client.generate(
        model="tools", prompt="Once upon a time", raw=True, options={**GREEDY, "num_predict": 6}
    )
    assert raw.response == greedy(reference, "Once upon a time", 6, raw=True)
    parts = list(
        client.generate(
            model="tools",
            prompt="Once upon a time",
            raw=True,
            stream=True,
            options={**GREEDY, "num_predict": 6},
        )
    )
    assert "".join(p.response for p in parts) == raw.response and parts[-1].done


def test_model_routes(client, srv, store):
    tags = client.list()
    assert [m.model for m in tags.models] == ["tools"]
    assert tags.models[0].details.family == "qwen3_moe" and tags.models[0].size > 0
    shown = client.show("tools")
    assert "tools" in shown.capabilities and "<tool_call>" in shown.template
    assert shown.modelinfo["general.architecture"] == "qwen3_moe"
    assert shown.modelinfo["qwen3_moe.context_length"] == CTX
    running = client.ps()
    assert [m.model for m in running.models] == ["tools"]
    assert httpx.get(srv.url + "/").text == "moeinf is running"
    assert httpx.get(srv.url + "/api/version").json()["version"] == engine.__version__
    loaded = client.chat(model="tools", messages=[])  # Ollama's "load the model" request
    assert loaded.done and loaded.done_reason == "load"


def test_ollama_errors(client, srv):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3", messages=HI)
    assert err.value.status_code == 404 and "tools" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tools", messages=[{"role": "user", "content": "sky " * (CTX + 5)}])
    assert err.value.status_code == 400 and "context" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tools", messages=HI, options={"temperature": -1})
    assert err.value.status_code == 400 and "temperature" in err.value.error
    r = httpx.post(srv.url + "/api/chat", content=b"{oops")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(srv.url + "/api/chat", json={"model": "tools", "messages": HI, "format": "json"})
    assert r.status_code == 400 and "format" in r.json()["error"]


def test_curl_style_body_without_content_type(srv):
    body = json.dumps({"model": "tools", "messages": HI, "stream": False, "options": {"num_predict": 2}})
    r = httpx.post(
        srv.url + "/api/chat", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 200 and r.json()["eval_count"] == 2


FORCE = {"logit_bias": {str(TOOL_TOKEN): 100}, "max_tokens": 1, "temperature": 0}


def test_openai_tool_call(srv, reference):
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    plain = oa.chat.completions.create(model="tools", messages=HI, max_tokens=1, temperature=0)
    r = oa.chat.completions.create(model="tools", messages=HI, tools=[WEATHER_TOOL], **FORCE)
    assert (
        r.usage.prompt_tokens
        == len(reference.prompt_ids(HI, tools=[WEATHER_TOOL]))
        > plain.usage.prompt_tokens
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL["arguments"]

    chunks = list(
        oa.chat.completions.create(model="tools", messages=HI, tools=[WEATHER_TOOL], stream=True, **FORCE)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == CALL["arguments"]
    assert "".join(d.content or "" for d in deltas) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # without tools the same token is just text; tool_choice "none" hides the tools from the template
    text = oa.chat.completions.create(model="tools", messages=HI, **FORCE)
    assert text.choices[0].message.content == TOOL_TEXT and not text.choices[0].message.tool_calls
    hidden = oa.chat.completions.create(
        model="tools", messages=HI, tools=[WEATHER_TOOL], tool_choice="none", **FORCE
    )
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens

    # the call and its result sent back: the template gets the arguments as an object
    history = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    follow = oa.chat.completions.create(
        model="tools", messages=history, tools=[WEATHER_TOOL], max_tokens=2, temperature=0
    )
    expected = [
        *HI,
        {"role": "assistant", "tool_calls": [{"function": CALL}]},
        {"role": "tool", "content": "18 degrees"},
    ]
    assert follow.usage.prompt_tokens == len(reference.prompt_ids(expected, tools=[WEATHER_TOOL]))


def test_ollama_tool_call(client):
    options = {"logit_bias": {str(TOOL_TOKEN): 100}, "num_predict": 1, "temperature": 0}
    r = client.chat(model="tools", messages=HI, tools=[WEATHER_TOOL], options=options, stream=False)
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and dict(call.function.arguments) == CALL["arguments"]
    assert r.message.content == ""
    parts = list(client.chat(model="tools", messages=HI, tools=[WEATHER_TOOL], options=options, stream=True))
    streamed = [tc for p in parts for tc in (p.message.tool_calls or [])]
    assert [c.function.name for c in streamed] == ["get_weather"] and parts[-1].done


def test_ndjson_disconnect_cancels(srv, client):
    body = {"model": "tools", "messages": HI, "options": {"num_predict": 100000, "temperature": 0}}
    with httpx.stream("POST", srv.url + "/api/chat", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert json.loads(next(lines))["done"] is False
        next(lines)
    srv.wait_idle()
    assert len(srv.state.session.cached_tokens) < CTX // 2
    assert client.chat(model="tools", messages=HI, options={"num_predict": 2}).eval_count == 2
