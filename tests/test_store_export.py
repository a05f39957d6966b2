"""`moeinf export`: a store model back to a Hugging Face checkpoint that transformers loads, with the
hub's tensor names and values (the source checkpoint's), and logits equal to moeinf's, for every family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from runtime_store import pull_tiny
from tiny_models import TINY_FAMILIES, checkpoint_tensors, load_reference

import engine
from engine.errors import MoeinfError
from engine.store.export import export_model

IDS = [0, 5, 17, 42, 99, 7, 3, 150, 21, 64]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_rebuilds_the_checkpoint_and_transformers_agrees(family, tmp_path, monkeypatch):
    home, root, ckpt = pull_tiny(family, tmp_path)
    monkeypatch.setenv("MOEINF_HOME", str(home))
    out = export_model(f"tiny-{family}", tmp_path / "exported")
    assert not (tmp_path / "exported.partial").exists()
    source, exported = checkpoint_tensors(ckpt), checkpoint_tensors(out)
    assert sorted(exported) == sorted(source)
    for name, t in source.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (root / name).read_bytes()

    ref = load_reference(out)
    with torch.no_grad():
        theirs = ref(torch.tensor([IDS])).logits[0].float()
    ours = engine.load(f"tiny-{family}", device="cpu", ctx=64).logits(IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_shards_with_an_index_and_refuses_a_full_directory(tmp_path, monkeypatch):
    home, _, ckpt = pull_tiny("mixtral", tmp_path)
    monkeypatch.setenv("MOEINF_HOME", str(home))
    out = export_model("tiny-mixtral", tmp_path / "sharded", shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(checkpoint_tensors(ckpt))
    assert load_reference(out) is not None
    with pytest.raises(MoeinfError, match="not empty"):
        export_model("tiny-mixtral", out)


def test_export_cli(tmp_path):
    home, _, _ = pull_tiny("qwen2_moe", tmp_path)
    env = {**os.environ, "MOEINF_HOME": str(home)}
    def run(*args):
        cmd = [sys.executable, "-m", "moeinf_cli", "export", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    r = run("tiny-qwen2_moe", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "hf") in r.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    r = run("nope", str(tmp_path / "hf2"))
    assert r.returncode != 0 and r.stderr.startswith("Error: ")
    r = run("tiny-qwen2_moe", str(tmp_path / "hf"))
    assert r.returncode != 0 and "not empty" in r.stderr and "Traceback" not in r.stderr
