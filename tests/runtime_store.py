"""Tiny models pulled into a private store once per test module (for runtime and `moeinf run` tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_tiny_checkpoint


def pull_tiny(family: str, base: Path, name: str | None = None) -> tuple[Path, Path, Path]:
    """(store home, store model dir, checkpoint dir) of tiny ``family`` pulled with ``moeinf pull``'s code."""
    from engine.store.pull import pull_model

    home = base / "home"
    ckpt = make_tiny_checkpoint(family, base / f"ckpt-{family}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEINF_HOME", str(home))
        pull_model(str(ckpt), name=name or f"tiny-{family}")
    return home, home / "models" / (name or f"tiny-{family}"), ckpt
