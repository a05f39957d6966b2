"""Tiny models pulled into a private store once per test module (for runtime and `moeinf run` tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint


def make_endless(ckpt: Path) -> None:
    """Zero the LM head's EOS rows of a tiny checkpoint, so a greedy answer does not end by itself."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    eos_ids = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    weights["lm_head.weight"][torch.tensor(eos_ids)] = 0.0
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def pull_tiny(family: str, base: Path, name: str | None = None, endless: bool = False) -> tuple[Path, Path, Path]:
    """(store home, store model dir, checkpoint dir) of tiny ``family`` pulled with ``moeinf pull``'s code.

    ``endless``: the LM head's EOS rows are zeroed, so a greedy answer does not end by itself."""
    from engine.store.pull import pull_model

    home = base / "home"
    ckpt = make_tiny_checkpoint(family, base / f"ckpt-{family}")
    if endless:
        make_endless(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEINF_HOME", str(home))
        pull_model(str(ckpt), name=name or f"tiny-{family}")
    return home, home / "models" / (name or f"tiny-{family}"), ckpt
