"""From a request to a running job and back: prompt ids, queueing, the piece stream, disconnects, counts.

Shared by the OpenAI and the Ollama routes; each route only maps its own fields in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from engine.errors import MoeinfError
from engine.runtime.sampling import SamplingParams
from engine.runtime.stats import GenerationStats
from engine.serve.errors import ApiError
from engine.serve.scheduler import Job, QueueFull
from engine.serve.state import ServeState
from engine.serve.tools import ToolCall, ToolCallStream


async def prompt_ids(
    state: ServeState,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    raw: bool = False,
    system: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    param: str = "messages",
) -> list[int]:
    """The prompt's token ids (the chat template applied unless ``raw``); 400 when it does not fit the context."""
    session = state.ready_session()
    try:
        ids = await run_in_threadpool(session.prompt_ids, prompt, raw, system, tools)
    except MoeinfError as err:
        raise ApiError(400, str(err), "invalid_prompt", param) from None
    return check_fits(session, ids, param)


def check_fits(session: Any, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise ApiError(400, "the prompt is empty; give some text", "invalid_prompt", param)
    if len(ids) >= session.ctx:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens but the context holds {session.ctx} (and needs room "
            f"for the reply); shorten the prompt or restart the server with a larger --ctx",
            "context_length_exceeded",
            param,
        )
    return ids


def client_of(request: Request, user: str | None = None) -> str:
    """Who a request is from, for the queue's turns: OpenAI's ``user`` field when given, else the address."""
    if user:
        return f"user:{user}"
    return f"host:{request.client.host}" if request.client else "host:?"


def submit(
    state: ServeState, ids: list[int], sampling: dict[str, Any], reuse_prefix: bool = True, client: str = ""
) -> Job:
    """Queue a generation for ``client``; 400 for bad sampling values, 503 with Retry-After when the queue
    is full. ``reuse_prefix`` False prefills the whole prompt even when the KV cache holds a prefix of it."""
    try:
        SamplingParams.from_options(sampling)
    except MoeinfError as err:
        raise ApiError(400, str(err), "invalid_sampling") from None
    job = Job(ids, sampling, asyncio.get_running_loop(), reuse_prefix, client)
    try:
        return state.scheduler.submit(job)
    except QueueFull as err:
        state.metrics.rejected.labels("queue_full").inc()
        raise ApiError(
            503,
            f"the server is busy ({err}); retry shortly",
            "server_busy",
            headers={"Retry-After": str(state.settings.retry_after_s)},
        ) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed its connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def pieces(
    state: ServeState, request: Request, job: Job, watch: bool
) -> AsyncIterator[str | GenerationStats]:
    """The job's text pieces and final stats. Leaving early (the stream closed or cancelled because the
    client went away, or ``watch`` saw the client go) cancels the job at once; the counts go to the
    metrics and to the access log (``request.state.usage``)."""
    watcher = asyncio.ensure_future(_disconnected(request)) if watch else None
    if watcher is not None:
        watcher.add_done_callback(lambda task: task.cancelled() or job.cancel())
    try:
        async for item in job.stream():
            yield item
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        _account(state, request, job)


def _account(state: ServeState, request: Request, job: Job) -> None:
    stats = job.stats
    if stats is None:
        job.cancel()
        reason = "error" if job.failed else "cancelled"
        state.metrics.generations.labels(reason).inc()
        request.state.usage = {"done_reason": reason}
        return
    ttft = job.first_piece - job.submitted if job.first_piece is not None else None
    wait = job.started - job.submitted if job.started is not None else None
    state.metrics.finished(stats, ttft, wait)
    request.state.usage = {
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.cached_tokens,
        "completion_tokens": stats.generated_tokens,
        "done_reason": stats.done_reason,
        "ttft_s": None if ttft is None else round(ttft, 4),
    }


async def answer_events(
    state: ServeState, request: Request, job: Job, tools: bool, watch: bool = False
) -> AsyncIterator[tuple[str, Any]]:
    """The answer as ``("text", str)``, ``("call", ToolCall)`` (when ``tools``: the model's tool calls,
    taken out of the text) and last ``("stats", GenerationStats)`` (absent when cancelled)."""
    scanner = ToolCallStream() if tools else None
    async for item in pieces(state, request, job, watch):
        if isinstance(item, str):
            text, calls = scanner.push(item) if scanner is not None else (item, [])
            if text:
                yield "text", text
            for call in calls:
                yield "call", call
        else:
            if scanner is not None and (tail := scanner.flush()):
                yield "text", tail
            yield "stats", item


async def collect_answer(
    state: ServeState, request: Request, job: Job, tools: bool
) -> tuple[str, list[ToolCall], GenerationStats]:
    """The whole answer of a non-streaming request (watching for the client to leave meanwhile):
    text, tool calls, stats."""
    parts: list[str] = []
    calls: list[ToolCall] = []
    stats = None
    try:
        async for kind, value in answer_events(state, request, job, tools, watch=True):
            if kind == "text":
                parts.append(value)
            elif kind == "call":
                calls.append(value)
            else:
                stats = value
    except MoeinfError as err:
        raise ApiError(500, f"generation failed: {err}", "generation_failed") from None
    if stats is None:  # cancelled: the client is gone, this answer goes nowhere
        raise ApiError(499, "the client closed the request", "client_closed")
    text = "".join(parts)
    return (text.strip() if calls else text), calls, stats
