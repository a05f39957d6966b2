"""Helpers for the model fidelity tests: a tiny random checkpoint pulled into a store with the real
converter (``engine.store.pull.pull_model``), and the transformers reference on the same weights.

Module-scoped fixtures run before the per-test ``MOEINF_HOME`` of conftest.py is set, so
``pull_tiny`` points ``MOEINF_HOME`` at its own directory while it pulls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_checkpoint


def pull_tiny(
    family: str,
    root: Path,
    layout: str = "per_expert",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path]:
    """Make the tiny checkpoint of ``family`` under ``root`` and pull it into ``root/home``;
    returns (checkpoint dir, store model dir)."""
    from engine.store.pull import pull_model

    ckpt = make_tiny_checkpoint(family, root / f"ckpt-{layout}", layout=layout, seed=seed, dtype=dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEINF_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = pull_model(str(ckpt), name=f"tiny-{family}-{layout}")
    return ckpt, Path(result.path)


def ref_logits(ref, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, V] of the transformers model on one sequence."""
    with torch.no_grad():
        return ref(tokens[None]).logits[0].float()


def pull_config(config, root: Path, name: str, seed: int = 0) -> tuple[Path, Path, torch.nn.Module]:
    """A random transformers model of ``config`` (norms and biases randomised like the tiny models),
    saved with a tokenizer and pulled into ``root/home``; returns (checkpoint, store dir, model)."""
    import transformers as tf
    from tiny_models import _randomise, make_tokenizer

    from engine.store.pull import pull_model

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    ckpt = root / f"ckpt-{name}"
    model.save_pretrained(str(ckpt))
    make_tokenizer(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEINF_HOME", str(root / "home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = pull_model(str(ckpt), name=name)
    return ckpt, Path(result.path), model
