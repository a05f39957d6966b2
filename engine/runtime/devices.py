"""Resolving the ``device`` and ``dtype`` a user asks for, with one-line errors."""

from __future__ import annotations

import torch

from engine.errors import MoeinfError
from engine.store.dtypes import lookup, parse_dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device ("auto": CUDA when available, else CPU); MoeinfError when it names
    CUDA/MPS that this machine does not have."""
    text = "cpu" if device is None else str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise MoeinfError(f"unknown device {text!r}; use cpu or cuda (e.g. --device cuda:0)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MoeinfError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoeinfError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MoeinfError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise MoeinfError(f"unsupported device {text!r}; use cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, stored: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: the one asked for (MoeinfError for an unknown name), else the stored weights'
    dtype (float16 becomes bfloat16 on the CPU, where float16 matmuls are slow), else float32."""
    asked = parse_dtype(dtype)
    if asked is not None:
        return asked
    chosen = lookup(stored) or torch.float32
    if chosen == torch.float16 and device.type == "cpu":
        chosen = torch.bfloat16
    return chosen
