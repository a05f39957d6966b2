"""Ollama-compatible routes: ``POST /api/chat``, ``POST /api/generate``, ``GET /api/tags``,
``POST /api/show``, ``GET /api/ps``, ``GET /api/version`` and ``GET /`` ("moeinf is running").

Ollama's defaults apply (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1 over the last 64
tokens), set per request through ``options`` with Ollama's names; options that only matter to
Ollama's own runner (``num_ctx``, ``num_gpu``, ``num_thread``, ...) are ignored; OpenAI's
``frequency_penalty``, ``presence_penalty`` and ``logit_bias`` are taken too. ``stream`` is on
unless the request says ``false``; streamed answers are NDJSON, one object per line, the last with
``done: true``, ``done_reason`` and the timing fields in nanoseconds (``total_duration``,
``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``, ``eval_count``, ``eval_duration``).
Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from engine import __version__
from engine.errors import MoeinfError
from engine.runtime.sampling import SamplingParams
from engine.serve.errors import ApiError, refuse_unsupported
from engine.serve.generation import answer_events, client_of, collect_answer, prompt_ids, submit
from engine.serve.state import ServeState
from engine.serve.tools import ToolCall
from engine.store.manifest import MANIFEST, read_manifest

log = logging.getLogger("moeinf.serve")

SAMPLER_OPTIONS = frozenset(f for f in SamplingParams.__dataclass_fields__)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None

    def sampling(self) -> dict[str, Any]:
        if self.format not in (None, ""):
            raise ApiError(400, "format (JSON mode) is not supported by this server")
        options = dict(self.options or {})
        ignored = sorted(k for k in options if k not in SAMPLER_OPTIONS)
        if ignored:
            log.debug("ignoring options %s", ", ".join(ignored))
        return {k: v for k, v in options.items() if k in SAMPLER_OPTIONS}


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    name: str = ""  # older clients send "name"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _durations(stats: Any) -> dict[str, Any]:
    ns = lambda s: int(round(s * 1e9))  # noqa: E731
    return {
        "total_duration": ns(stats.total_s),
        "load_duration": ns(stats.load_s),
        "prompt_eval_count": stats.prompt_eval_count,
        "prompt_eval_duration": ns(stats.prompt_eval_s),
        "eval_count": stats.generated_tokens,
        "eval_duration": ns(stats.eval_s),
    }


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ApiError(
                400, f"messages[{i}].role must be system, user, assistant or tool, got {m.get('role')!r}"
            )
        if m.get("images"):
            raise ApiError(400, f"messages[{i}] has images; this server takes text only")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string")
        out.append({**m, "content": content or ""})
    return out


class _ModelFacts:
    """What /api/tags, /api/show and /api/ps say about the served model (from its store directory)."""

    def __init__(self, state: ServeState):
        self.state = state

    def _root(self) -> Path | None:
        session = self.state.session
        return Path(session.model_root) if session is not None and session.model_root else None

    def _manifest(self) -> dict[str, Any]:
        root = self._root()
        if root is None:
            return {}
        try:
            return read_manifest(root)
        except MoeinfError:
            return {}

    def digest(self) -> str:
        root = self._root()
        try:
            data = (root / MANIFEST).read_bytes() if root is not None else b""
        except OSError:
            data = b""
        return hashlib.sha256(data).hexdigest()

    def modified_at(self) -> str:
        root = self._root()
        try:
            mtime = (root / MANIFEST).stat().st_mtime if root is not None else self.state.started
        except OSError:
            mtime = self.state.started
        return datetime.fromtimestamp(mtime, UTC).isoformat().replace("+00:00", "Z")

    def size(self) -> int:
        return int(self._manifest().get("total_bytes") or 0)

    def details(self) -> dict[str, Any]:
        session = self.state.session
        family = (session.config.get("model_type") if session is not None else None) or self._manifest().get(
            "family"
        )
        params = session.parameter_count() if session is not None else 0
        dtype = str(
            self._manifest().get("dtype") or (str(session.dtype).removeprefix("torch.") if session else "")
        )
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": family or "",
            "families": [family] if family else [],
            "parameter_size": _count(params),
            "quantization_level": dtype.upper(),
        }

    def entry(self) -> dict[str, Any]:
        name = self.state.settings.model
        return {
            "name": name,
            "model": name,
            "modified_at": self.modified_at(),
            "size": self.size(),
            "digest": self.digest(),
            "details": self.details(),
        }

    def show(self) -> dict[str, Any]:
        session = self.state.session
        manifest = self._manifest()
        family = manifest.get("family") or session.config.get("model_type") or "unknown"
        info: dict[str, Any] = {
            "general.architecture": family,
            "general.parameter_count": session.parameter_count(),
            f"{family}.context_length": session.ctx,
            f"{family}.block_count": manifest.get("num_layers"),
        }
        if manifest.get("num_experts"):
            info[f"{family}.expert_count"] = manifest["num_experts"]
            info[f"{family}.expert_used_count"] = manifest.get("top_k")
        template = session.tokenizer.chat_template or ""
        capabilities = ["completion"] + (["tools"] if "tools" in template else [])
        return {
            "modelfile": f"# moeinf model {self.state.settings.model}\nFROM {session.model_root}\n",
            "parameters": "",
            "template": template,
            "details": self.details(),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": self.modified_at(),
        }


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def build_router(state: ServeState) -> APIRouter:
    router = APIRouter()
    facts = _ModelFacts(state)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def root() -> PlainTextResponse:
        return PlainTextResponse("moeinf is running")

    @router.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [facts.entry()] if state.loaded else []}

    @router.get("/api/ps")
    async def ps() -> dict[str, Any]:
        if not state.loaded:
            return {"models": []}
        entry = facts.entry()
        on_gpu = state.session.device.type == "cuda"
        return {
            "models": [
                {
                    **entry,
                    "expires_at": "9999-12-31T23:59:59Z",
                    "size_vram": entry["size"] if on_gpu else 0,
                    "context_length": state.session.ctx,
                }
            ]
        }

    @router.post("/api/show")
    async def show(req: ModelRequest) -> dict[str, Any]:
        state.check_model(req.model or req.name)
        state.ready_session()
        return facts.show()

    @router.post("/api/chat")
    async def chat(req: ChatRequest, request: Request) -> Any:
        state.check_model(req.model)
        sampling = req.sampling()
        state.ready_session()
        if not req.messages:  # Ollama's way to load a model: answer at once
            return {
                "model": state.settings.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load",
                "done": True,
            }
        tools = req.tools or None
        ids = await prompt_ids(state, _messages(req), tools=tools)
        job = submit(state, ids, sampling, client=client_of(request))
        if not req.stream:
            text, calls, stats = await collect_answer(state, request, job, bool(tools))
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = [c.ollama() for c in calls]
            return {
                "model": state.settings.model,
                "created_at": _now(),
                "message": message,
                "done_reason": stats.done_reason,
                "done": True,
                **_durations(stats),
            }
        return _ndjson(_chat_lines(state, request, job, bool(tools)))

    @router.post("/api/generate")
    async def generate(req: GenerateRequest, request: Request) -> Any:
        state.check_model(req.model)
        given = {"suffix": req.suffix, "template": req.template, "context": req.context, "images": req.images}
        refuse_unsupported(given, "; send the whole prompt (or use /api/chat)")
        sampling = req.sampling()
        state.ready_session()
        if not req.prompt:
            return {
                "model": state.settings.model,
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        prompt = req.prompt if not (req.raw and req.system) else f"{req.system}\n\n{req.prompt}"
        ids = await prompt_ids(
            state, prompt, raw=req.raw, system=None if req.raw else req.system, param="prompt"
        )
        job = submit(state, ids, sampling, client=client_of(request))
        if not req.stream:
            text, _, stats = await collect_answer(state, request, job, False)
            return {
                "model": state.settings.model,
                "created_at": _now(),
                "response": text,
                "done": True,
                "done_reason": stats.done_reason,
                **_durations(stats),
            }
        return _ndjson(_generate_lines(state, request, job))

    return router


def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def encoded() -> AsyncIterator[bytes]:
        async for line in lines:
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

    return StreamingResponse(encoded(), media_type="application/x-ndjson")


async def _chat_lines(
    state: ServeState, request: Request, job: Any, tools: bool
) -> AsyncIterator[dict[str, Any]]:
    model = state.settings.model
    try:
        async for kind, value in answer_events(state, request, job, tools):
            if kind == "text":
                yield {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": value},
                    "done": False,
                }
            elif kind == "call":
                call: ToolCall = value
                yield {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": "", "tool_calls": [call.ollama()]},
                    "done": False,
                }
            else:
                yield {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": value.done_reason,
                    "done": True,
                    **_durations(value),
                }
    except MoeinfError as err:
        yield {"error": f"generation failed: {err}"}


async def _generate_lines(state: ServeState, request: Request, job: Any) -> AsyncIterator[dict[str, Any]]:
    model = state.settings.model
    try:
        async for kind, value in answer_events(state, request, job, False):
            if kind == "text":
                yield {"model": model, "created_at": _now(), "response": value, "done": False}
            elif kind == "stats":
                yield {
                    "model": model,
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": value.done_reason,
                    **_durations(value),
                }
    except MoeinfError as err:
        yield {"error": f"generation failed: {err}"}
