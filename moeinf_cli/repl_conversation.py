"""The conversation the REPL keeps: system prompt, user/assistant turns, fitting into the context.

``Conversation.messages_for(user_text)`` is the list handed to ``Session.generate``;
``fit_to_context`` drops the oldest turns (never the system prompt, never the new message) until the
prompt plus room for the answer fits the context; ``save``/``load`` write and read the JSON of ``/save``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, str]

SAVE_FORMAT = "moeinf-conversation"


@dataclass
class Conversation:
    """The chat so far: an optional system prompt and alternating user/assistant messages."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self, extra: list[Message] | None = None) -> list[Message]:
        """The chat-template input: the system message first (if any), the turns, then ``extra``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns] + list(extra or [])

    def add_exchange(self, user: str, assistant: str) -> None:
        self.turns.append({"role": "user", "content": user})
        self.turns.append({"role": "assistant", "content": assistant})

    def clear(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.turns.clear()

    def drop_oldest_exchange(self) -> bool:
        """Remove the oldest user message and the answer after it; False when there is nothing to drop."""
        if not self.turns:
            return False
        del self.turns[0]
        while self.turns and self.turns[0]["role"] != "user":
            del self.turns[0]
        return True

    @property
    def exchanges(self) -> int:
        return sum(1 for m in self.turns if m["role"] == "user")


@dataclass(frozen=True)
class FitResult:
    """What ``fit_to_context`` did: exchanges dropped, prompt tokens after, and whether it now fits."""

    dropped: int
    prompt_tokens: int
    fits: bool


def answer_reserve(ctx: int, num_predict: int | None) -> int:
    """Tokens kept free for the answer: ``num_predict`` when set (at most half the context), else a quarter."""
    if num_predict is not None and num_predict > 0:
        return min(num_predict, ctx // 2)
    return ctx // 4


def fit_to_context(conversation: Conversation, user_text: str, count_tokens: Callable[[list[Message]], int],
                   ctx: int, reserve: int) -> FitResult:
    """Drop the oldest exchanges until the prompt for ``user_text`` leaves ``reserve`` tokens of ``ctx``.

    The system prompt and the new message are never dropped; ``fits`` is False when even they alone
    leave no room (the caller then refuses the message). The conversation is changed in place.
    """
    limit = max(ctx - reserve, 1)
    new = [{"role": "user", "content": user_text}]
    dropped = 0
    tokens = count_tokens(conversation.messages(new))
    while tokens > limit and conversation.drop_oldest_exchange():
        dropped += 1
        tokens = count_tokens(conversation.messages(new))
    return FitResult(dropped=dropped, prompt_tokens=tokens, fits=tokens <= limit)


def save_conversation(path: Path, conversation: Conversation, model: str, parameters: dict[str, Any]) -> Path:
    """Write the conversation as JSON to ``path`` (written aside, then renamed); returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a directory; give a file name such as chat.json", str(path))
    if path.suffix == "":
        path = path.with_suffix(".json")
    data = {
        "format": SAVE_FORMAT,
        "model": model,
        "system": conversation.system,
        "parameters": parameters,
        "messages": conversation.messages(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_conversation(path: Path) -> tuple[str | None, Conversation, dict[str, Any]]:
    """Read a file written by ``save_conversation``: (model, conversation, parameters).

    Raises ValueError with a one-line reason when the file is not such a conversation.
    """
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT or not isinstance(data.get("messages"), list):
        raise ValueError(f"{path} is not a conversation saved with /save")
    system = data.get("system")
    turns: list[Message] = []
    for m in data["messages"]:
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            raise ValueError(f"{path} holds a malformed message: {m!r}")
        if m["role"] == "system":
            system = system or m["content"]
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    model = data.get("model") if isinstance(data.get("model"), str) else None
    return model, Conversation(system=system, turns=turns), params
