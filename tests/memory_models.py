"""Store models for the memory tests: tiny random checkpoints (tests/tiny_models.py) converted with the
store converter, and greedy decoding over ``CausalLM.forward``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tiny_models import make_tiny_checkpoint, read_config

from engine.store.convert import Converter


def tiny_store(family: str, root: Path, seed: int = 0) -> Path:
    """A store directory (dense + 4 KiB-aligned expert shards) of the tiny ``family`` checkpoint."""
    ckpt = make_tiny_checkpoint(family, root / f"{family}-ckpt", seed=seed)
    out = root / f"{family}-store"
    out.mkdir(parents=True, exist_ok=True)
    conv = Converter(read_config(ckpt), out)
    for i, shard in enumerate(sorted(ckpt.glob("*.safetensors")), start=1):
        conv.convert_shard(shard, i)
    assert not conv.missing(), conv.missing()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, out / name)
    shutil.rmtree(ckpt)
    return out


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens after ``prompt``: one prefill forward, then ``steps`` one-token forwards."""
    with torch.inference_mode():
        logits = model.forward(torch.tensor(prompt, dtype=torch.long), 0)
        out = [int(logits[-1].argmax())]
        pos = len(prompt)
        for _ in range(steps - 1):
            logits = model.forward(torch.tensor([out[-1]], dtype=torch.long), pos)
            pos += 1
            out.append(int(logits[-1].argmax()))
    return out
