"""ASGI middleware: the API key check and one structured access-log line (and request count) per request.

The access log is JSON, one object per line on the ``moeinf.access`` logger: time, request id (the
client's ``X-Request-ID`` or a new one, echoed back), client, method, path, status, duration, and the
generation's token counts when there was one. It is written when the response has been sent (a stream
included), so the duration and counts are final.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.serve.errors import error_body

access_log = logging.getLogger("moeinf.access")

OPEN_PATHS = frozenset({"/health"})  # answered without the API key


def _as_json(scope: Scope) -> Scope:
    """Every body here is JSON: ``curl -d '{...}'`` (sent as a form) is read as JSON, as Ollama reads it."""
    headers = scope.get("headers") or []
    kinds = [v for k, v in headers if k == b"content-type"]
    if scope.get("method") != "POST" or (kinds and kinds[0].split(b";")[0].strip() == b"application/json"):
        return scope
    rest = [(k, v) for k, v in headers if k != b"content-type"]
    return {**scope, "headers": [*rest, (b"content-type", b"application/json")]}


class ServeMiddleware:
    """Checks ``Authorization: Bearer KEY`` (when a key is set), counts and logs every request."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Any, routes: frozenset[str]
    ):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.routes = routes  # paths counted by name; the rest as "other" (bounded label values)

    def _authorised(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope = _as_json(scope)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        status = {"code": 500}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is None:
                await self.app(scope, receive, send_logged)
            else:
                await refusal(scope, receive, send_logged)
        finally:
            self._log(scope, request_id, status["code"], time.perf_counter() - t0)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> JSONResponse | None:
        """A 401 without the API key, a 413 for a body over the limit; None to go on."""
        path = scope["path"]
        if not self._authorised(scope):
            body = error_body(
                path, 401, "a valid API key is needed: send 'Authorization: Bearer KEY'", "invalid_api_key"
            )
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            body = error_body(
                path,
                413,
                f"the request body is {int(length)} bytes, more than the "
                f"{self.max_body_bytes} this server takes; send a shorter request",
                "request_too_large",
            )
            return JSONResponse(body, status_code=413)
        return None

    def _log(self, scope: Scope, request_id: str, status: int, duration: float) -> None:
        path = scope["path"]
        self.metrics.requests.labels(path if path in self.routes else "other", str(status)).inc()
        client = scope.get("client")
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "request_id": request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope.get("method"),
            "path": path,
            "status": status,
            "duration_s": round(duration, 4),
        }
        usage = (scope.get("state") or {}).get("usage")
        if usage:
            line.update(usage)
        access_log.info(json.dumps(line))
