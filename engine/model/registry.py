"""Model families by config.json ``model_type``.

A family is one module (or package) under ``engine/model/families/`` that calls
``register(Family(...))`` at import time; ``get_family(model_type)`` imports the family modules on
first use, so adding a family touches no other file. ``Family.build(args, experts)`` returns an (unloaded) ``CausalLM``; the loader creates it
on the meta device and assigns the dense tensors by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import MoeinfError
from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource
from engine.model.transformer import CausalLM


def strip_model_prefix(name: str) -> str | None:
    """The default tensor-name map: transformers' ``model.layers.0...`` -> ``layers.0...``."""
    return name[len("model.") :] if name.startswith("model.") else name


@dataclass(frozen=True)
class Family:
    """How one ``model_type`` maps onto the shared layers.

    ``parse(config) -> ModelArgs`` (may return a subclass); ``build(args, experts) -> CausalLM``;
    ``rename(store_name) -> parameter name`` (None drops the tensor; applied to every dense tensor);
    ``keep_fp32``: parameter-name suffixes loaded in float32 whatever the model dtype.
    """

    model_type: str
    build: Callable[[Any, ExpertSource], CausalLM]
    parse: Callable[[dict[str, Any]], ModelArgs] = ModelArgs.from_config
    rename: Callable[[str], str | None] = strip_model_prefix
    keep_fp32: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def _import_families() -> None:
    import engine.model.families as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")


def supported_model_types() -> list[str]:
    """Every model_type some module of ``engine/model/families`` registers (imports them all)."""
    _import_families()
    return sorted(_FAMILIES)


def get_family(model_type: str) -> Family:
    if model_type not in _FAMILIES:
        _import_families()
    family = _FAMILIES.get(model_type)
    if family is None:
        raise MoeinfError(
            f"model type {model_type!r} is not supported (supported: {', '.join(supported_model_types())})"
        )
    return family
