"""Byte-level helpers shared by the block formats (fp16 fields, nibbles, rounding)."""

from __future__ import annotations

import torch


def f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``at`` of every block (uint8 [n, B]) as float32 [n, 1]."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).to(torch.float32)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [n] or [n, 1] -> its fp16 bytes, uint8 [n, 2]."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def to_f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 and back (what a stored fp16 scale decodes to)."""
    return x.to(torch.float16).to(torch.float32)


def low_high(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [n, m] -> [n, 2, m]: low nibbles, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def join_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (any integer dtype) -> uint8 bytes ``low | high << 4``."""
    return (low.to(torch.uint8) & 0x0F) | (high.to(torch.uint8) << 4)


def nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest integer (ties to even: at an exact tie both neighbours are equally near)."""
    return torch.round(x)


def codes(
    x: torch.Tensor, step: torch.Tensor, lo: int, hi: int, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Nearest codes q in [lo, hi] for ``x ~ step * q - offset`` (step 0 gives code 0, or lo when lo > 0)."""
    t = x if offset is None else x + offset
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = nearest(t / safe).clamp(lo, hi)
    return torch.where(step == 0, torch.full_like(q, max(lo, 0)), q)


def sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences over the last dimension."""
    return ((a - b) ** 2).sum(dim=-1)
