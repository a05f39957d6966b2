"""`moeinf pull org/repo` against a local server that answers like the hub (real huggingface_hub client)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from hub_server import HubServer, Repo
from tiny_models import make_tiny_checkpoint

from engine.store.manifest import read_manifest
from engine.store.paths import models_dir
from engine.store.pull import pull_model


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    mix = make_tiny_checkpoint("mixtral", root / "mix", max_shard_size="150KB")
    (mix / "original").mkdir()
    (mix / "original" / "consolidated.00.pt").write_bytes(b"x" * 4096)  # never needed, never fetched
    (mix / "README.md").write_text("# tiny\n")
    qwen = make_tiny_checkpoint("qwen3_moe", root / "qwen", layout="fused")
    bin_only = root / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((qwen / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return {"acme/tiny-mix": Repo(mix), "acme/qwen": Repo(qwen), "acme/gated": Repo(qwen, gated_token="hf_secret"),
            "acme/bin-only": Repo(bin_only)}


@pytest.fixture
def hub(repos):
    with HubServer(repos) as server:
        yield server


def run_pull(hub_url: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("HF_TOKEN", None)
    e.update({"NO_PROXY": "127.0.0.1,localhost", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_XET": "1",
              "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": "5"})
    if hub_url:
        e["HF_ENDPOINT"] = hub_url
    e.update(env)
    return subprocess.run([sys.executable, "-m", "moeinf_cli", "pull", *args], capture_output=True, text=True, env=e,
                          timeout=120)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_pull_from_hub_equals_local_pull_and_fetches_only_needed_files(hub, repos):
    r = run_pull(hub.url, "acme/tiny-mix")
    assert r.returncode == 0, r.stderr
    assert "pulled: tiny-mix (mixtral" in r.stdout
    m = read_manifest(models_dir() / "tiny-mix")
    assert m["source"] == {"kind": "hub", "repo": "acme/tiny-mix", "revision": "main", "commit": repos["acme/tiny-mix"].commit}

    local = pull_model(str(repos["acme/tiny-mix"].root), name="local").manifest
    strip = {"config.json"}  # identical too, but compare the weights explicitly
    assert {k: v["sha256"] for k, v in m["files"].items() if k not in strip} == {
        k: v["sha256"] for k, v in local["files"].items() if k not in strip
    }
    fetched = set(hub.downloaded())
    shards = {f for f in repos["acme/tiny-mix"].files() if f.startswith("model-")}
    assert shards <= fetched
    assert not any(f.startswith("original/") or f == "README.md" for f in fetched)
    # converted shards were removed from the HF cache (the pull downloaded them); meta files stay
    cache = list((models_dir().parent / "hf").rglob("model-*.safetensors"))
    assert cache == []


def test_keep_download_then_offline_pull_from_cache(hub):
    r = run_pull(hub.url, "acme/qwen", "--keep-download", "--revision", "main")
    assert r.returncode == 0, r.stderr
    n = len(hub.requests)
    r = run_pull(hub.url, "acme/qwen", "--name", "qwen-offline", HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert len(hub.requests) == n  # nothing asked of the server
    assert read_manifest(models_dir() / "qwen-offline")["family"] == "qwen3_moe"


def test_offline_with_nothing_cached(hub):
    msg = _one_line_error(run_pull(hub.url, "acme/qwen", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE" in msg and "acme/qwen" in msg


def test_hub_unreachable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    msg = _one_line_error(run_pull(f"http://127.0.0.1:{port}", "acme/qwen"))
    assert "cannot reach the hub" in msg


def test_gated_repo_needs_token(hub):
    msg = _one_line_error(run_pull(hub.url, "acme/gated"))
    assert "gated" in msg and "HF_TOKEN" in msg
    msg = _one_line_error(run_pull(hub.url, "acme/gated", HF_TOKEN="hf_wrong"))
    assert "gated" in msg
    r = run_pull(hub.url, "acme/gated", HF_TOKEN="hf_secret")
    assert r.returncode == 0, r.stderr


def test_unknown_repo_revision_and_alias(hub):
    msg = _one_line_error(run_pull(hub.url, "acme/nope"))
    assert "acme/nope not found" in msg
    msg = _one_line_error(run_pull(hub.url, "acme/qwen", "--revision", "v9"))
    assert "revision 'v9' not found" in msg
    msg = _one_line_error(run_pull(hub.url, "acme/bin-only"))
    assert "has no model.safetensors" in msg
    msg = _one_line_error(run_pull(hub.url, "mixtrl"))
    assert "did you mean mixtral" in msg
    assert not any("mixtrl" in p for _, p in hub.requests)


def test_list_aliases():
    r = run_pull(None, "--list-aliases")
    assert r.returncode == 0
    for alias, repo in [("mixtral", "mistralai/Mixtral-8x7B-v0.1"), ("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite"),
                        ("qwen1.5-moe", "Qwen/Qwen1.5-MoE-A2.7B"), ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B"),
                        ("olmoe", "allenai/OLMoE-1B-7B-0924"), ("gpt-oss-20b", "openai/gpt-oss-20b"),
                        ("mixtral-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1")]:
        assert any(line.split() == [alias, repo] for line in r.stdout.splitlines()), alias
