"""A real ``moeinf serve`` app under uvicorn in a thread, on a free localhost port, for the server tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from engine.serve.server import build_server
from engine.serve.state import ServeSettings


class ThreadServer:
    """``with ThreadServer(settings, load) as srv:`` serves at ``srv.url`` until the block ends (a drain)."""

    def __init__(self, settings: ServeSettings, load: Callable[[], Any], wait_loaded: bool = True):
        self._listening = threading.Event()
        self.port = 0
        self.server, self.state = build_server(settings, load, "127.0.0.1", 0, self._on_listening, "warning")
        self._thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self._wait_loaded = wait_loaded

    def _on_listening(self, host: str, port: int) -> None:
        self.port = port
        self._listening.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        if not self._listening.wait(60):
            raise RuntimeError("the test server did not start listening")
        if self._wait_loaded and not self.state.wait_loaded(120):
            raise RuntimeError(f"the test server's model did not load: {self.state.load_error}")
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no generation runs (a cancelled one has stopped)."""
        deadline = time.monotonic() + timeout
        while self.state.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.state.scheduler.running == 0, "a generation is still running"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self._thread.join(60)
