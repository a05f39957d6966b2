"""Activation functions by their config.json names (``hidden_act``), as transformers' ACT2FN."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.errors import MoeinfError


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise MoeinfError(
            f"unsupported hidden_act {name!r} in config.json (supported: {', '.join(sorted(ACTIVATIONS))})"
        ) from None
