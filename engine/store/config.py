"""The one reader of ``config.json`` (a store model's, or a source checkpoint's before a pull).

What a config *means* (the family, its arguments and MoE layout) is the families' business; this
module only turns the file into a dict, with a one-line error for every way the file can be wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import MoeinfError

CONFIG = "config.json"


def read_config(directory: str | Path, hint: str = "pull the model again") -> dict:
    """The parsed ``config.json`` of ``directory``: a JSON object, or a MoeinfError naming the file,
    what is wrong with it, and ``hint`` (the fix)."""
    path = Path(directory) / CONFIG
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MoeinfError(f"no {CONFIG}: {path} is missing; {hint}") from None
    except UnicodeDecodeError:
        raise MoeinfError(f"{path} is not UTF-8 text; {hint}") from None
    except OSError as e:
        raise MoeinfError(f"{path} cannot be read ({e.strerror or e}); {hint}") from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise MoeinfError(f"{path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(config, dict):
        raise MoeinfError(f"{path} holds a JSON {type(config).__name__}, not an object; {hint}")
    return config
