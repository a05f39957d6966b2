"""Run the app under uvicorn: bind (localhost by default), load the model, serve, drain on a signal.

Ctrl+C or SIGTERM stops accepting connections, lets every request in flight finish (streams
included), then stops the worker and closes the model; the process exits 0. A second Ctrl+C stops at
once. ``sse-starlette``'s own shutdown (which would cut streams short) is turned off for this.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from engine.serve.app import create_app
from engine.serve.state import ServeSettings, ServeState

log = logging.getLogger("moeinf.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a signal only asks it to drain (it is not raised again once drained), and it
    reports the address it listens on (``--port 0`` picks a free port)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[str, int], None] | None = None):
        super().__init__(config)
        self.on_listening = on_listening
        self.signalled = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self.signalled = True
        log.info(
            "%s: finishing the requests in flight, then exiting (Ctrl+C again to stop now)",
            signal.Signals(sig).name,
        )
        self.should_exit = True

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.on_listening is not None and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_listening(host, port)


def configure_logging(level: str = "info") -> None:
    """Server lines on stderr: ``moeinf.access`` as bare JSON lines, the rest with time and level."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    bare = logging.StreamHandler(sys.stderr)
    bare.setFormatter(logging.Formatter("%(message)s"))
    for name, handler in (("moeinf", plain), ("uvicorn", plain), ("moeinf.access", bare)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(lvl)
        logger.propagate = False


def build_server(
    settings: ServeSettings,
    load: Callable[[], Any],
    host: str = "127.0.0.1",
    port: int = 8080,
    on_listening: Callable[[str, int], None] | None = None,
    log_level: str = "info",
) -> tuple[DrainingServer, ServeState]:
    """The uvicorn server and the state behind its app (not started)."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()  # streams finish on shutdown; they are not cut
    state = ServeState(settings, load)
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        log_level=log_level,
        timeout_graceful_shutdown=None,
        lifespan="on",
    )
    server = DrainingServer(config, on_listening)

    def stop_on_failure() -> None:
        server.should_exit = True

    state.on_load_failure = stop_on_failure
    return server, state


def serve(
    settings: ServeSettings,
    load: Callable[[], Any],
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
) -> int:
    """Serve until a signal; the exit status (0 after a drain, 1 when the model failed to load)."""
    configure_logging(log_level)

    def listening(h: str, p: int) -> None:
        shown = f"[{h}]" if ":" in h else h
        log.info("moeinf serve: %s on http://%s:%d (OpenAI: /v1, Ollama: /api)", settings.model, shown, p)

    server, state = build_server(settings, load, host, port, listening, log_level)
    server.run()
    if state.load_error is not None:
        return 1
    if not server.started:
        return 1  # could not bind: uvicorn logged why
    return 0
