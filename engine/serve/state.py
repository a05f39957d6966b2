"""What the server knows: the model (loading, loaded or failed), its scheduler, metrics and settings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import MoeinfError
from engine.serve.errors import ApiError
from engine.serve.metrics import ServerMetrics
from engine.serve.scheduler import Scheduler

log = logging.getLogger("moeinf.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The server's options: ``model`` is the name clients use (the store name); ``api_key`` None = open."""

    model: str
    api_key: str | None = None
    max_queue: int = 64
    batch_size: int = 1  # sequences decoded together; 1 = one request at a time (reusing the KV prefix)
    retry_after_s: int = 1  # what a 503 tells clients to wait
    max_body_bytes: int = 32 * 1024 * 1024  # larger request bodies get 413


class ServeState:
    """One loaded model behind the routes. ``load`` runs in a thread so /health can answer 503 meanwhile."""

    def __init__(self, settings: ServeSettings, load: Callable[[], Any]):
        self.settings = settings
        self.started = time.time()
        self.scheduler = Scheduler(settings.max_queue, settings.batch_size)
        self.session: Any = None
        self.load_error: str | None = None
        self.loaded_at: float | None = None
        self.on_load_failure: Callable[[], None] | None = None  # the server stops itself
        self._load = load
        self._loaded = threading.Event()
        self.metrics = ServerMetrics(
            lambda: self.scheduler.waiting,
            lambda: self.scheduler.running,
            self._loaded.is_set,
            self._cache_stats,
            self.scheduler.batch_stats,
        )

    def _cache_stats(self) -> Any:
        experts = getattr(self.session, "experts", None)
        return experts.stats() if experts is not None and hasattr(experts, "stats") else None

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_now, name="moeinf-load", daemon=True)
        thread.start()
        return thread

    def _load_now(self) -> None:
        try:
            session = self._load()
            try:
                self.scheduler.start(session)  # --batch-size > 1: the batch's KV slots are allocated here
            except BaseException:
                close = getattr(session, "close", None)
                if callable(close):
                    close()
                raise
        except MoeinfError as err:
            self.load_error = str(err)
        except Exception as err:  # the server cannot go on without a model: say why, then stop
            log.exception("loading the model failed")
            self.load_error = f"loading the model failed: {err}"
        else:
            self.session = session
            self.loaded_at = time.time()
            self._loaded.set()
            log.info("model %s loaded in %.1f s", self.settings.model, getattr(session, "load_s", 0.0))
            return
        log.error("Error: %s", self.load_error)
        if self.on_load_failure is not None:
            self.on_load_failure()

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def ready_session(self) -> Any:
        """The session, or a 503 while the model is loading (or failed to)."""
        if self.loaded:
            return self.session
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", "model_load_failed")
        raise ApiError(
            503,
            f"the model {self.settings.model} is loading; retry shortly",
            "model_loading",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def check_model(self, requested: str | None, param: str = "model") -> None:
        """404 unless ``requested`` names the served model (``name`` or ``name:latest``)."""
        name = self.settings.model
        if requested in (name, f"{name}:latest"):
            return
        if not requested:
            raise ApiError(
                400, f"the request names no model; this server serves '{name}'", "model_missing", param
            )
        raise ApiError(
            404,
            f"the model '{requested}' does not exist here; this server serves '{name}'",
            "model_not_found",
            param,
        )

    def close(self) -> None:
        """Stop the worker and release the session (after the server drained its requests)."""
        self.scheduler.stop(timeout=30)
        close = getattr(self.session, "close", None)
        if callable(close):
            close()
