"""``App``: the ``typer.Typer`` of the CLI, whose help writes placeholders as people read them.

Recent typer prints a parameter's Python type (``--raw <bool>``, ``--stop <list[str]>``) and a required
argument as ``{model}``. Here an option shows its metavar (``--ctx N``), a flag shows nothing after its
name, and arguments read ``MODEL [PROMPT]`` as in llama.cpp's and Ollama's help. Commands registered on
an ``App`` (and on the sub-apps made with it) get this without asking.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

_TYPE_NAMES = {"int": "N", "float": "FLOAT", "str": "TEXT", "Path": "PATH", "list[str]": "TEXT"}


def _metavar(param: Any) -> str:
    if isinstance(param, TyperArgument):
        return (param.metavar or param.name or "").upper()
    if getattr(param, "is_flag", False):
        return ""
    if param.metavar is not None:
        return param.metavar
    bare = param.bare_type() if hasattr(param, "bare_type") else ""
    return _TYPE_NAMES.get(bare, "VALUE")


def plain(param: Any) -> None:
    """Make one parameter's help read ``--ctx N`` / ``MODEL`` / ``[PROMPT]`` instead of ``<int>`` / ``{model}``."""
    name = _metavar(param)
    if isinstance(param, TyperArgument):
        param.metavar = name
        suffix = "..." if param.nargs != 1 else ""
        param.display_type_rich = lambda ctx: None
        param._usage_display_name = lambda: (name if param.required else f"[{name}]") + suffix
    else:
        param.metavar = name


class _Plain:
    """Mixin for a typer command or group: ``plain`` on each of its parameters (``--help`` included)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            plain(param)
        return params


class PlainCommand(_Plain, TyperCommand):
    pass


class PlainGroup(_Plain, TyperGroup):
    pass


class App(typer.Typer):
    """``typer.Typer`` whose commands default to ``PlainCommand`` and whose own class is ``PlainGroup``."""

    def __init__(self, *args: Any, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, cls=cls or PlainGroup, **kwargs)

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or PlainCommand, **kwargs)
