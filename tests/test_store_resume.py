"""A pull killed with SIGKILL midway resumes from its verified files; the store never lists it half-built."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_models import make_tiny_checkpoint

from engine.store.manifest import list_models, read_manifest
from engine.store.paths import models_dir
from engine.store.pull import pull_model


def _cli(*args: str, **env: str) -> list[str]:
    return [sys.executable, "-m", "moeinf_cli", *args]


def _env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(extra)
    return e


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("src") / "qwen", max_shard_size="150KB")
    assert len(list(d.glob("model-*.safetensors"))) >= 4
    return d


def _kill_after_shards(src, name: str, shards: int) -> dict:
    """Start a throttled pull, SIGKILL it once ``shards`` source shards are committed; the state it left."""
    proc = subprocess.Popen(_cli("pull", str(src), "--name", name), env=_env(MOEINF_PULL_THROTTLE_S="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_path = models_dir() / f".partial-{name}" / "pull-state.json"
    deadline = time.time() + 90
    state = None
    try:
        while time.time() < deadline:
            assert name not in [n for n, _ in list_models()]  # never listed while building
            if state_path.is_file():
                try:
                    state = json.loads(state_path.read_text())
                except ValueError:
                    state = None
                if state and len(state["done_shards"]) >= shards:
                    break
            assert proc.poll() is None, "the pull finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the pull made no progress")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return state


def test_sigkill_midway_then_resume(sharded):
    state = _kill_after_shards(sharded, "q", 2)
    assert not (models_dir() / "q").exists()
    listed = subprocess.run(_cli("list"), capture_output=True, text=True, env=_env())
    assert listed.returncode == 0 and "q " not in listed.stdout.replace("NAME", "")

    r = subprocess.run(_cli("pull", str(sharded), "--name", "q"), capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resuming:") == 1 and f"resuming: {len(state['done_shards'])} source shard(s)" in r.stderr
    assert not (models_dir() / ".partial-q").exists()

    clean = pull_model(str(sharded), name="clean").manifest["files"]
    resumed = read_manifest(models_dir() / "q")["files"]
    assert resumed == clean  # every file, byte for byte (sha256)
    assert "q" in [n for n, _ in list_models()]


def test_resume_rebuilds_when_a_kept_file_is_damaged(sharded):
    state = _kill_after_shards(sharded, "d", 1)
    victim = next(iter(k for k in state["files"] if k.startswith("experts/") or k.startswith("dense/")))
    path = models_dir() / ".partial-d" / victim
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    r = subprocess.run(_cli("pull", str(sharded), "--name", "d"), capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr
    clean = pull_model(str(sharded), name="clean2").manifest["files"]
    assert read_manifest(models_dir() / "d")["files"] == clean
