"""The FastAPI application: routes, error shapes, middleware, and the model's lifecycle.

``create_app(state)`` builds it over a ``ServeState``; starting the app (its lifespan) starts loading
the model in a thread, stopping it (after the server drained its requests) stops the worker and
closes the session.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from engine import __version__
from engine.serve.errors import install_error_handlers
from engine.serve.middleware import ServeMiddleware
from engine.serve.ollama_api import build_router as ollama_router
from engine.serve.openai_api import build_router as openai_router
from engine.serve.state import ServeState


def create_app(state: ServeState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="moeinf",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.serve = state
    install_error_handlers(app)
    routers = [openai_router(state), ollama_router(state)]
    for router in routers:
        app.include_router(router)

    @app.get("/health")
    async def health() -> Any:
        if state.loaded:
            return {"status": "ok", "model": state.settings.model}
        status = "error" if state.load_error else "loading"
        body = {"status": status, "model": state.settings.model}
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})

    @app.get("/metrics")
    async def metrics() -> Response:
        from engine.serve.metrics import CONTENT_TYPE

        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    routes = frozenset(getattr(r, "path", "") for router in (*routers, app.router) for r in router.routes)
    app.add_middleware(
        ServeMiddleware,
        api_key=state.settings.api_key,
        max_body_bytes=state.settings.max_body_bytes,
        metrics=state.metrics,
        routes=routes,
    )
    return app
