"""`moeinf serve` as a process: it reports its address, serves, and on SIGTERM or Ctrl+C finishes the
stream in flight before exiting 0; user errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from runtime_store import pull_tiny

ADDRESS = re.compile(r"on http://127\.0\.0\.1:(\d+) ")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home, _, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("serve-cli"), name="tiny", endless=True)
    return home


class Served:
    """A ``moeinf serve`` subprocess; its stderr lines gathered as they come."""

    def __init__(self, home, *args, api_key=None):
        env = {**os.environ, "MOEINF_HOME": str(home)}
        env.pop("MOEINF_API_KEY", None)
        if api_key is not None:
            env["MOEINF_API_KEY"] = api_key
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moeinf_cli",
                "serve",
                "tiny",
                "--port",
                "0",
                "--device",
                "cpu",
                "--ctx",
                "512",
                *args,
            ],
            env=env,
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def url(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := ADDRESS.search(line):
                    return f"http://127.0.0.1:{m.group(1)}"
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("no address line:\n" + "".join(self.lines))

    def wait_healthy(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(url + "/health").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("never healthy:\n" + "".join(self.lines))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_the_stream_in_flight_and_exits_0(home, sig):
    served = Served(home)
    try:
        url = served.url()
        served.wait_healthy(url)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        events = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        served.proc.send_signal(sig)  # mid-stream
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 60  # the whole answer, not cut by the shutdown
        assert served.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        access = [json.loads(line) for line in served.lines if line.startswith("{")]
        assert any(a["path"] == "/v1/chat/completions" and a["completion_tokens"] == 60 for a in access)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def test_api_key_from_the_environment(home):
    served = Served(home, api_key="k3y")
    try:
        url = served.url()
        served.wait_healthy(url)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def _cli(home, *args, env_extra=None):
    env = {**os.environ, "MOEINF_HOME": str(home), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "moeinf_cli", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_user_errors_are_one_line(home):
    r = _cli(home, "nope")
    assert r.returncode != 0 and r.stderr.startswith("Error: ") and "nope" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli(home, "tiny", "--port", str(port))
    assert r.returncode != 0 and r.stderr.startswith("Error: cannot listen on") and "--port" in r.stderr
    r = _cli(home, "tiny", "--max-queue", "-1")
    assert r.returncode != 0 and "--max-queue" in r.stderr and "Traceback" not in r.stderr
    r = _cli(home, "tiny", "--batch-size", "0")
    assert r.returncode != 0 and r.stderr.startswith("Error: --batch-size") and "Traceback" not in r.stderr
    for bad in (["--expert-budget", "lots"], ["--policy", "fifo"], ["--dtype", "int3"], ["--ctx", "1"]):
        r = _cli(home, "tiny", "--port", "0", *bad)
        assert r.returncode == 1 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1, bad
