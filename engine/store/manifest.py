"""Reading store models: ``read_manifest``, ``resolve_model``, ``list_models``.

See ``engine/store/__init__.py`` for the manifest fields. A directory is a store model when it holds
a ``manifest.json``; half-built models live under ``models/.partial-<name>`` and are never listed.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from engine.errors import MoeinfError
from engine.store.paths import models_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PARTIAL_PREFIX = ".partial-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")


def check_name(name: str) -> str:
    """``name`` if it can name a store model (letters, digits, ``. _ : + -``); else MoeinfError."""
    if not _NAME_RE.match(name or "") or len(name) > 200:
        raise MoeinfError(
            f"invalid model name {name!r}; use letters, digits and . _ : + - (e.g. --name my-model)"
        )
    return name


def read_manifest(model_root: str | Path) -> dict:
    """The parsed ``manifest.json`` of a store model directory; MoeinfError if missing or unreadable."""
    path = Path(model_root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeinfError(f"{model_root} is not a moeinf model (no {MANIFEST}); pull it with `moeinf pull`") from None
    except (OSError, json.JSONDecodeError) as err:
        raise MoeinfError(f"{path} is unreadable ({err}); run `moeinf rm` and pull the model again") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MoeinfError(
            f"{path} has store format {version}, this moeinf reads format {FORMAT_VERSION}; pull the model again"
        )
    return manifest


def store_names() -> list[str]:
    """Names of the complete models in the store, sorted."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
    )


def resolve_model(name_or_path: str | Path) -> Path:
    """The directory of a store model given its store name or a path to a store model directory.

    Unknown names raise MoeinfError suggesting close store names and ``moeinf pull``.
    """
    text = str(name_or_path)
    if text and _NAME_RE.match(text) and not text.startswith("."):
        candidate = models_dir() / text
        if (candidate / MANIFEST).is_file():
            return candidate
    path = Path(text).expanduser()
    if ("/" in text or text.startswith(".")) and path.is_dir():
        if (path / MANIFEST).is_file():
            return path.resolve()
        raise MoeinfError(f"{text} is a directory but not a moeinf model (no {MANIFEST}); pull it with `moeinf pull {text}`")
    close = difflib.get_close_matches(text, store_names(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise MoeinfError(f"model {text!r} not found in the store; {hint}pull it with `moeinf pull {text}`")


def list_models() -> list[tuple[str, dict]]:
    """(name, manifest) of every complete store model, sorted by name; unreadable ones are skipped."""
    out = []
    for name in store_names():
        try:
            out.append((name, read_manifest(models_dir() / name)))
        except MoeinfError:
            continue
    return out
