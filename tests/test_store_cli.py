"""`moeinf list/show/rm/verify` and the one-line errors of `moeinf pull`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
from tiny_models import make_tiny_checkpoint

from engine.errors import MoeinfError
from engine.store import pull as pull_mod
from engine.store import shards
from engine.store.manifest import read_manifest, resolve_model
from engine.store.paths import models_dir
from engine.store.pull import pull_model


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeinf_cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def src_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    make_tiny_checkpoint("mixtral", root / "mix")
    make_tiny_checkpoint("olmoe", root / "olmoe", layout="fused")
    return root


def copy_ckpt(src_root, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(src_root / name, dst)
    return dst


def test_list_show_rm(src_root):
    pull_model(str(src_root / "mix"), name="mix")
    pull_model(str(src_root / "olmoe"), name="ol", dtype="bf16")
    r = cli("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "SIZE", "EXPERTS", "MODIFIED"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"mix", "ol"}
    assert "mixtral" in rows["mix"] and "8 top-2" in rows["mix"] and "just now" in rows["mix"]
    assert "olmoe" in rows["ol"] and "KB" in rows["ol"]

    r = cli("show", "mix")
    assert r.returncode == 0, r.stderr
    assert "mixtral" in r.stdout and "8 per MoE layer, top-2, in layers 0-1 (16 shards)" in r.stdout
    assert "float32" in r.stdout and "upcycled" not in r.stdout
    assert json.loads(cli("show", "ol", "--json").stdout)["dtype"] == "bfloat16"

    from engine.store.paths import traces_dir

    traces_dir("mix").mkdir(parents=True)
    (traces_dir("mix") / "traces.npz").write_bytes(b"recorded")
    r = cli("rm", "mix")
    assert r.returncode == 0 and "deleted 'mix'" in r.stdout
    assert not (models_dir() / "mix").exists() and not traces_dir("mix").exists()  # its traces go with it
    assert [line.split()[0] for line in cli("list").stdout.splitlines()[1:]] == ["ol"]
    msg = one_line_error(cli("rm", "mix"))
    assert "not found" in msg and "moeinf pull" in msg
    msg = one_line_error(cli("show", "o1"))
    assert "did you mean ol" in msg


def test_show_says_upcycled_not_trained(src_root):
    root = pull_model(str(src_root / "mix"), name="up").path
    m = read_manifest(root)
    m["source"]["upcycled"] = {"from": {"kind": "local", "path": "/x"}, "num_experts": 8, "top_k": 2}
    (root / "manifest.json").write_text(json.dumps(m))
    r = cli("show", "up")
    assert r.returncode == 0 and "upcycled, not trained" in r.stdout


def test_verify_names_a_flipped_byte_and_a_missing_file(src_root):
    root = pull_model(str(src_root / "mix"), name="v").path
    r = cli("verify", "v")
    assert r.returncode == 0 and "all 22 files verified" in r.stdout
    shard = root / "experts" / "L1" / "E5.safetensors"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01
    shard.write_bytes(bytes(data))
    (root / "dense" / "part-00001.safetensors").unlink()
    r = cli("verify", "v")
    assert r.returncode == 1
    assert "BAD  experts/L1/E5.safetensors: sha256 mismatch" in r.stdout
    assert "BAD  dense/part-00001.safetensors: missing" in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("BAD")]) == 2
    assert "2 file(s) of v failed verification" in r.stderr and "Traceback" not in r.stderr


def test_help_shows_examples():
    for cmd in ("pull", "list", "show", "rm", "verify"):
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "Example" in r.stdout, cmd


def test_unsupported_family_lists_supported(src_root, tmp_path):
    d = copy_ckpt(src_root, "olmoe", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(cli("pull", str(d)))
    assert "unsupported model family 'bert'" in msg
    for fam in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"):
        assert fam in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_or_truncated_source(src_root, tmp_path, damage):
    d = copy_ckpt(src_root, "olmoe", tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[18:])
    with pytest.raises(MoeinfError, match="model.safetensors is corrupt or truncated .*re-export the checkpoint"):
        pull_model(str(d), name="bad")
    assert not (models_dir() / "bad").exists()


def test_bad_arguments():
    assert "unknown dtype 'fp8'" in one_line_error(cli("pull", "./nowhere", "--dtype", "fp8"))
    assert "no such checkpoint directory" in one_line_error(cli("pull", "./nowhere"))
    assert "no such GGUF file" in one_line_error(cli("pull", "missing.gguf"))
    assert "invalid model name" in one_line_error(cli("pull", "mixtral", "--name", "../evil"))
    assert "did you mean mixtral" in one_line_error(cli("pull", "mixtrl"))


def test_incomplete_checkpoint(src_root, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(src_root, "mix", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.6.w2.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(MoeinfError, match="incomplete: missing layer 1 expert 6: down_proj.weight"):
        pull_model(str(d), name="inc")
    assert not (models_dir() / "inc").exists() and not (models_dir() / ".partial-inc").exists()


def test_disk_full_while_writing_removes_partial_output(src_root, monkeypatch):
    calls = {"n": 0}
    real_put = shards.StreamingShardWriter._put

    def put(self, data):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, data)

    monkeypatch.setattr(shards.StreamingShardWriter, "_put", put)
    with pytest.raises(MoeinfError, match="disk full") as err:
        pull_model(str(src_root / "mix"), name="full")
    assert "partial model was removed" in str(err.value)
    assert not (models_dir() / ".partial-full").exists() and not (models_dir() / "full").exists()


def test_not_enough_disk_space_is_refused_up_front(src_root, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pull_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MoeinfError, match="not enough disk space"):
        pull_model(str(src_root / "mix"), name="nospace")
    with pytest.raises(MoeinfError, match="not found"):
        resolve_model("nospace")


def test_pull_again_over_a_damaged_model_repairs_it_or_says_how(src_root):
    src = str(src_root / "mix")
    pull_model(src, name="mix")
    root = models_dir() / "mix"
    shard = sorted((root / "experts").rglob("*.safetensors"))[3]
    shard.unlink()  # a missing (or resized) file: pulled again
    r = cli("pull", src, "--name", "mix")
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and shard.name in r.stderr and r.stdout.startswith("pulled: mix")
    assert cli("verify", "mix").returncode == 0

    data = bytearray(shard.read_bytes())  # a flipped byte keeps the size: kept, and the way out is named
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("pull", src, "--name", "mix")
    assert r.returncode == 0 and r.stdout.startswith("up to date: mix")
    assert "moeinf verify mix" in r.stderr and "--force" in r.stderr
    assert cli("verify", "mix").returncode == 1
    r = cli("pull", src, "--name", "mix", "--force")
    assert r.returncode == 0 and r.stdout.startswith("pulled: mix"), r.stderr
    assert cli("verify", "mix").returncode == 0


def test_pulls_leave_no_lock_partial_or_work_files(src_root, tmp_path):
    cli("pull", str(src_root / "mix"), "--name", "mix")
    one_line_error(cli("pull", "notamodel"))
    one_line_error(cli("pull", str(tmp_path / "missing-dir"), "--name", "never"))
    bad = copy_ckpt(src_root, "mix", tmp_path)
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    one_line_error(cli("pull", str(bad), "--name", "truncated"))
    assert sorted(p.name for p in models_dir().iterdir()) == ["mix"]
    assert not (models_dir().parent / "tmp").exists()
