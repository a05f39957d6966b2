"""Rotary position embeddings with the scaling variants transformers implements.

``rope_parameters(config)`` turns a config.json dict (transformers 5's nested ``rope_parameters``,
or older ``rope_theta`` + ``rope_scaling``) into one flat dict with ``rope_type`` and ``rope_theta``.
``inv_freq_for(params, dim, max_position_embeddings)`` returns ``(inv_freq [dim/2], attention_factor)``
exactly as ``transformers.modeling_rope_utils`` computes them for the types default, linear,
dynamic, yarn (mscale / mscale_all_dim / attention_factor / truncate) and llama3.

``RotaryEmbedding`` precomputes cos/sin tables for positions ``0..max_seq_len-1`` (float32 math, then
cast to the model dtype, as transformers does) and hands out rows for ``start_pos..start_pos+T-1``;
the dynamic type recomputes its frequencies from the sequence length the way transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.errors import MoeinfError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def rope_parameters(config: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """Flat rope parameter dict (``rope_type``, ``rope_theta``, and the type's own keys)."""
    nested = config.get("rope_parameters")
    if isinstance(nested, dict) and nested and all(isinstance(v, dict) for v in nested.values()):
        # per-layer-type parameters ({"full_attention": {...}, ...}): every layer type must agree
        values = list(nested.values())
        nested = values[0]
    params: dict[str, Any] = dict(nested) if isinstance(nested, dict) else {}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        for k, v in scaling.items():
            params.setdefault(k, v)
    params.setdefault("rope_type", params.get("type") or "default")
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = config.get("rope_theta") if config.get("rope_theta") is not None else default_theta
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        omp = config.get("original_max_position_embeddings")
        if omp is not None:
            params["original_max_position_embeddings"] = omp
        else:
            params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    if params["rope_type"] not in ROPE_TYPES:
        raise MoeinfError(
            f"unsupported rope type {params['rope_type']!r} in config.json (supported: {', '.join(ROPE_TYPES)})"
        )
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_for(
    params: dict[str, Any], dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim // 2] float32, attention_factor)`` for one rope parameter dict."""
    rope_type = params["rope_type"]
    base = float(params["rope_theta"])
    if rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(base, dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        factor = params["factor"]
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        inv_freq = _default_inv_freq(base, dim)
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, base, dim, max_position_embeddings)
    raise MoeinfError(f"unsupported rope type {rope_type!r}")


def _yarn_inv_freq(
    params: dict[str, Any], base: float, dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def _cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


class RotaryEmbedding(nn.Module):
    """cos/sin rows ([T, dim], model dtype) for positions ``start_pos..start_pos+T-1``."""

    def __init__(self, params: dict[str, Any], dim: int, max_position_embeddings: int):
        super().__init__()
        self.params = params
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.dynamic = params["rope_type"] == "dynamic"
        self.attention_factor = 1.0
        self.original_inv_freq: torch.Tensor | None = None
        self.inv_freq: torch.Tensor | None = None
        self._max_seq_len_cached = max_position_embeddings
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.dtype = torch.float32

    def setup(self, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compute the frequencies and precompute the tables for ``max_seq_len`` positions on ``device``."""
        self.dtype = dtype
        with torch.device("cpu"):
            inv_freq, self.attention_factor = inv_freq_for(self.params, self.dim, self.max_position_embeddings)
        self.original_inv_freq = self.inv_freq = inv_freq.to(device)
        self._max_seq_len_cached = self.max_position_embeddings
        if self.dynamic:
            return
        cos, sin = _cos_sin(self.inv_freq, torch.arange(max_seq_len, device=device), self.attention_factor)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)

    def forward(self, start_pos: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is not None and self.sin is not None:
            return self.cos[start_pos : start_pos + seqlen], self.sin[start_pos : start_pos + seqlen]
        # dynamic NTK: transformers recomputes inv_freq whenever the sequence grows past what it
        # last covered, and resets once a call is back within the original length
        assert self.inv_freq is not None and self.original_inv_freq is not None, "setup() was not called"
        seq_len = start_pos + seqlen
        if seq_len > self._max_seq_len_cached:
            self.inv_freq, self.attention_factor = inv_freq_for(
                self.params, self.dim, self.max_position_embeddings, seq_len=seq_len
            )
            self.inv_freq = self.inv_freq.to(self.original_inv_freq.device)
            self._max_seq_len_cached = seq_len
        if seq_len < self.max_position_embeddings and self._max_seq_len_cached > self.max_position_embeddings:
            self.inv_freq = self.original_inv_freq
            self._max_seq_len_cached = self.max_position_embeddings
        positions = torch.arange(start_pos, seq_len, device=self.inv_freq.device)
        cos, sin = _cos_sin(self.inv_freq, positions, self.attention_factor)
        return cos.to(self.dtype), sin.to(self.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, dim] by cos/sin [T, dim] (the rotate-half convention)."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return x * cos + rotate_half(x) * sin
