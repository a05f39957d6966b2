"""Tool calls in the model's output: Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Chat templates that take ``tools`` (Qwen2.5/3, Hermes, many fine-tunes) ask the model to answer a call
as JSON between ``<tool_call>`` tags. ``ToolCallStream`` takes the calls out of the streamed pieces,
holding back text from where a tag may start until the call closes. A block whose JSON does not parse, or has no name, stays text.
Conversations sent back (an assistant turn's ``tool_calls`` with JSON-string arguments) are given to
the template with the arguments as objects, as Hugging Face templates expect (``to_template_messages``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }
        if index is not None:
            out["index"] = index
        return out

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def parse_call(body: str) -> ToolCall | None:
    """One call from the JSON between the tags, or None when it is not a call."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, Mapping):
        return None
    return ToolCall(data["name"], dict(args), f"call_{uuid.uuid4().hex[:24]}")


class ToolCallStream:
    """``push(piece) -> (text to release, calls completed)``; ``flush()`` releases what is held at the end."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, piece: str) -> tuple[str, list[ToolCall]]:
        text = self._held + piece
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = text.find(OPEN)
            if start < 0:
                keep = _partial_open(text)
                out.append(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
                break
            end = text.find(CLOSE, start)
            if end < 0:
                out.append(text[:start])
                self._held = text[start:]
                break
            call = parse_call(text[start + len(OPEN) : end].strip())
            if call is None:
                out.append(text[: end + len(CLOSE)])
            else:
                out.append(text[:start])
                calls.append(call)
            text = text[end + len(CLOSE) :]
        released = "".join(out)
        return (released.strip() if calls and not released.strip() else released), calls

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _partial_open(text: str) -> int:
    """Length of the longest suffix of ``text`` that starts ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


def to_template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the chat template: tool-call arguments sent as JSON strings become objects."""
    out = []
    for message in messages:
        msg = dict(message)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                call = dict(call)
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                call["function"] = fn
                fixed.append(call)
            msg["tool_calls"] = fixed
        out.append(msg)
    return out
