"""OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

OpenAI's defaults apply (temperature 1, top_p 1, no top-k, no repetition penalty); ``max_tokens`` /
``max_completion_tokens``, ``stop`` (up to 4), ``seed``, ``frequency_penalty``/``presence_penalty``,
``logit_bias``, ``tools``/``tool_choice`` (``auto`` or ``none``) and ``stream`` with
``stream_options.include_usage`` are honoured; llama-server's extras ``top_k``, ``min_p``,
``repeat_penalty`` and ``cache_prompt`` (False: no KV prefix reuse) too. What the engine cannot do
(``n`` > 1, logprobs, JSON mode, a forced tool choice) is refused with a 400 that says so. Streaming answers are server-sent events ending in
``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from engine.errors import MoeinfError
from engine.serve.errors import ApiError, refuse_unsupported
from engine.serve.generation import answer_events, check_fits, client_of, collect_answer, prompt_ids, submit
from engine.serve.state import ServeState
from engine.serve.tools import ToolCall, to_template_messages


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both completion routes take."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    user: str | None = None
    # llama-server / vLLM extras
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    cache_prompt: bool = True  # llama-server's: False prefills the whole prompt again

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        if self.n != 1:
            raise ApiError(
                400,
                f"n={self.n} is not supported; this server returns one choice (n=1)",
                "unsupported_parameter",
                "n",
            )
        if self.logprobs:
            raise ApiError(
                400, "logprobs are not supported by this server", "unsupported_parameter", "logprobs"
            )
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop takes at most 4 sequences, got {len(stops)}", "invalid_value", "stop")
        bias = {}
        for token, value in (self.logit_bias or {}).items():
            if not token.lstrip("-").isdigit() or not -100 <= value <= 100:
                raise ApiError(
                    400,
                    f"logit_bias maps token ids to numbers in [-100, 100]; got {token!r}: {value}",
                    "invalid_value",
                    "logit_bias",
                )
            bias[int(token)] = value
        options = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "min_p": self.min_p or 0.0,
            "repeat_penalty": self.repeat_penalty or 1.0,
            "seed": self.seed,
            "num_predict": -1 if max_tokens is None else max_tokens,
            "stop": stops,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "logit_bias": bias,
        }
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def _text_of(content: Any, index: int) -> str:
    """A message's content as text: a string, or a list of text parts (other parts refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400,
                    f"messages[{index}] has a '{kind}' part; this server takes text only",
                    "unsupported_content",
                    f"messages[{index}].content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(
        400,
        f"messages[{index}].content must be a string or a list of text parts",
        "invalid_value",
        f"messages[{index}].content",
    )


def _chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(
                400,
                f"messages[{i}].role must be system, user, assistant or tool, got {role!r}",
                "invalid_value",
                f"messages[{i}].role",
            )
        msg = {k: v for k, v in m.items() if k != "content"}
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = _text_of(m.get("content"), i)
        out.append(msg)
    return to_template_messages(out)


def _chat_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    choice = req.tool_choice
    if choice is None or choice == "auto":
        return req.tools or None
    if choice == "none":
        return None
    raise ApiError(
        400,
        f"tool_choice {json.dumps(choice)} is not supported; use 'auto' or 'none'",
        "unsupported_parameter",
        "tool_choice",
    )


def _usage(stats: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def _finish(stats: Any, calls: list[ToolCall]) -> str:
    return "tool_calls" if calls else ("length" if stats.done_reason == "length" else "stop")


def _sse(data: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(data, ensure_ascii=False)}


def build_router(state: ServeState) -> APIRouter:
    router = APIRouter()

    def model_card() -> dict[str, Any]:
        return {
            "id": state.settings.model,
            "object": "model",
            "created": int(state.started),
            "owned_by": "moeinf",
        }

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return model_card()

    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        state.check_model(req.model)
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise ApiError(
                400,
                f"response_format {fmt!r} is not supported; only 'text'",
                "unsupported_parameter",
                "response_format",
            )
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sampling = req.sampling(max_tokens)
        tools = _chat_tools(req)
        ids = await prompt_ids(state, _chat_messages(req), tools=tools)
        job = submit(state, ids, sampling, req.cache_prompt, client_of(request, req.user))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": state.settings.model,
            "system_fingerprint": "moeinf",
        }
        if not req.stream:
            text, calls, stats = await collect_answer(state, request, job, bool(tools))
            message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            return {
                **base,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(stats, calls)}
                ],
                "usage": _usage(stats),
            }
        return EventSourceResponse(
            _chat_stream(state, request, job, base, bool(tools), req.include_usage), ping=0, sep="\n"
        )

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        state.check_model(req.model)
        refuse_unsupported({"echo": req.echo, "suffix": req.suffix, "best_of": req.best_of not in (None, 1)})
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = check_fits(state.ready_session(), [int(p) for p in prompt], "prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(
                        400,
                        f"prompt lists take one prompt here, got {len(prompt)}",
                        "invalid_value",
                        "prompt",
                    )
                prompt = prompt[0]
            ids = await prompt_ids(state, str(prompt), raw=True, param="prompt")
        sampling = req.sampling(16 if req.max_tokens is None else req.max_tokens)  # OpenAI's default: 16
        job = submit(state, ids, sampling, req.cache_prompt, client_of(request, req.user))
        base = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.settings.model,
            "system_fingerprint": "moeinf",
        }
        if not req.stream:
            text, _, stats = await collect_answer(state, request, job, False)
            return {
                **base,
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(stats, [])}
                ],
                "usage": _usage(stats),
            }
        return EventSourceResponse(
            _completion_stream(state, request, job, base, req.include_usage), ping=0, sep="\n"
        )

    return router


_STREAM_ERROR = {"type": "server_error", "param": None, "code": "generation_failed"}


async def _chat_stream(
    state: ServeState, request: Request, job: Any, base: dict[str, Any], tools: bool, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    base = {**base, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, str]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    calls: list[ToolCall] = []
    try:
        async for kind, value in answer_events(state, request, job, tools):
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "call":
                yield chunk({"tool_calls": [value.openai(index=len(calls))]})
                calls.append(value)
            else:
                yield chunk({}, _finish(value, calls))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(value)})
                yield {"data": "[DONE]"}
    except MoeinfError as err:
        yield _sse({"error": {"message": f"generation failed: {err}", **_STREAM_ERROR}})


async def _completion_stream(
    state: ServeState, request: Request, job: Any, base: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None = None) -> dict[str, str]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    try:
        async for kind, value in answer_events(state, request, job, False):
            if kind == "text":
                yield chunk(value)
            else:
                yield chunk("", _finish(value, []))
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(value)})
                yield {"data": "[DONE]"}
    except MoeinfError as err:
        yield _sse({"error": {"message": f"generation failed: {err}", **_STREAM_ERROR}})
