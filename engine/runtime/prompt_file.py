"""Files of prompts (``moeinf run --batch``, ``moeinf trace record``): text or JSON lines.

* Text: one prompt per non-empty line.
* JSON lines (``.jsonl``/``.ndjson``, or every non-empty line starting with ``{``): one object a line
  with ``"prompt"`` (a text) or ``"messages"`` (a list of ``{"role", "content"}``), and optionally
  ``"id"`` (any JSON value, copied to the output), ``"system"`` (a text), ``"raw"`` (true: no chat
  template) and ``"options"`` (sampling options by Ollama's names, e.g. ``{"temperature": 0,
  "num_predict": 64}``; they override the command line's for that prompt).

Every mistake names the file and line: ``prompts.jsonl:7 has neither "prompt" (text) nor "messages" (list)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import MoeinfError

FIELDS = ("prompt", "messages", "id", "system", "raw", "options")


@dataclass
class PromptItem:
    """One prompt of a file: ``index`` counts prompts from 0 in file order; ``line`` is its line number."""

    index: int
    line: int
    prompt: str | list[dict[str, Any]]
    id: Any = None
    system: str | None = None
    raw: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def read_prompt_file(path: Path | str) -> list[PromptItem]:
    """The prompts of ``path`` (see the module docstring); MoeinfError for a missing, unreadable,
    empty or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoeinfError(f"prompts file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoeinfError(f"cannot read prompts file {path} ({e})") from None
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (
        bool(lines) and all(ln.startswith("{") for _, ln in lines)
    )
    items: list[PromptItem] = []
    for n, ln in lines:
        if not is_jsonl:
            items.append(PromptItem(len(items), n, ln))
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError:
            raise MoeinfError(f"{path}:{n} is not valid JSON; use one JSON object per line") from None
        items.append(_item(obj, path, n, len(items)))
    if not items:
        raise MoeinfError(f"prompts file {path} holds no prompts")
    return items


def _item(obj: Any, path: Path, n: int, index: int) -> PromptItem:
    where = f"{path}:{n}"
    if not isinstance(obj, dict):
        raise MoeinfError(f'{where} is not a JSON object; write {{"prompt": "..."}} on each line')
    if isinstance(obj.get("prompt"), str):
        prompt: str | list[dict[str, Any]] = obj["prompt"]
    elif isinstance(obj.get("messages"), list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in obj["messages"]
    ):
        prompt = obj["messages"]
    else:
        raise MoeinfError(
            f'{where} has neither "prompt" (text) nor "messages" (list of {{"role", "content"}})'
        )
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise MoeinfError(f"{where} has unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise MoeinfError(f'{where}: "system" must be a text')
    raw = obj.get("raw", False)
    if not isinstance(raw, bool):
        raise MoeinfError(f'{where}: "raw" must be true or false')
    if raw and not isinstance(prompt, str):
        raise MoeinfError(f'{where}: "raw" needs "prompt" (a text), not "messages"')
    options = obj.get("options") or {}
    if not isinstance(options, dict):
        raise MoeinfError(f'{where}: "options" must be an object, e.g. {{"temperature": 0}}')
    return PromptItem(index, n, prompt, obj.get("id"), system, raw, dict(options))
