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
# The fields every reader relies on, with their JSON types (bool is not an int here).
REQUIRED: dict[str, tuple[type, ...]] = {
    "name": (str,), "family": (str,), "source": (dict,), "dtype": (str,), "created": (str,),
    "num_layers": (int,), "num_experts": (int,), "top_k": (int,), "moe_layers": (list,), "hidden_size": (int,),
    "dense_bytes": (int,), "expert_bytes": (int,), "total_bytes": (int,), "files": (dict,),
}


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoeinfError(f"{path} is unreadable ({_first_line(err)}); {_rebuild(model_root)}") from None
    if not isinstance(manifest, dict):
        raise MoeinfError(f"{path} is not a manifest (a JSON {type(manifest).__name__}); {_rebuild(model_root)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise MoeinfError(
            f"{path} has store format {version}, this moeinf reads format {FORMAT_VERSION}; "
            f"{_rebuild(model_root)}"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    wrong = [k for k, types in REQUIRED.items()
             if k in manifest and (not isinstance(manifest[k], types) or isinstance(manifest[k], bool))]
    if missing or wrong:
        what = "; ".join(x for x in (missing and f"lacks {', '.join(missing)}",
                                      wrong and f"has a wrong type in {', '.join(wrong)}") if x)
        raise MoeinfError(f"{path} {what}; {_rebuild(model_root)}")
    return manifest


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _rebuild(model_root: str | Path) -> str:
    name = Path(model_root).name
    return f"`moeinf rm {name}` and pull it again"


def store_names() -> list[str]:
    """Names of the models in the store (those with a manifest, readable or not), sorted."""
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
    from engine.store.hub import is_repo_id, resolve_alias

    if resolve_alias(text) or is_repo_id(text):
        how = f"pull it with `moeinf pull {text}`"
    else:
        how = "`moeinf list` shows the store, `moeinf pull --list-aliases` models to pull"
    raise MoeinfError(f"model {text!r} not found in the store; {hint}{how}")


def list_models() -> list[tuple[str, dict]]:
    """(name, manifest) of every readable store model, sorted by name (``broken_models`` has the others)."""
    return [(name, m) for name, m in _scan() if isinstance(m, dict)]


def broken_models() -> list[tuple[str, str]]:
    """(name, what is wrong) of every store model whose manifest cannot be used, sorted by name."""
    return [(name, str(m)) for name, m in _scan() if isinstance(m, MoeinfError)]


def _scan() -> list[tuple[str, dict | MoeinfError]]:
    out: list[tuple[str, dict | MoeinfError]] = []
    for name in store_names():
        try:
            out.append((name, read_manifest(models_dir() / name)))
        except MoeinfError as err:
            out.append((name, err))
    return out
