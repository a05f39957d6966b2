"""HTTP errors of the server, each rendered in the shape its clients expect.

OpenAI routes (``/v1/...``) answer ``{"error": {"message", "type", "param", "code"}}`` as OpenAI does;
Ollama routes answer ``{"error": "message"}`` as Ollama does. Handlers raise ``ApiError``; request
validation errors become 400s, unknown routes 404s, in the same shapes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# OpenAI's error types by status
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error answer: status, one-line message, OpenAI's ``code``/``param`` and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def refuse_unsupported(fields: dict[str, Any], hint: str = "") -> None:
    """A 400 naming the first of ``fields`` (name -> given and not supported) that was given."""
    for name, given in fields.items():
        if given:
            raise ApiError(
                400, f"{name} is not supported by this server{hint}", "unsupported_parameter", name
            )


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(
    path: str, status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer on ``path``."""
    if is_openai_path(path):
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": message}


def error_response(path: str, err: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(path, err.status, err.message, err.code, err.param),
        status_code=err.status,
        headers=err.headers,
    )


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, and the field (OpenAI's ``param``)."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if param is None:
        return f"invalid request body: {msg}", None
    return f"invalid value for '{param}': {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return error_response(request.url.path, ApiError(400, message, "invalid_request", param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models or GET /api/tags"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return error_response(
            request.url.path, ApiError(err.status_code, message, None, None, dict(err.headers or {}))
        )
