"""Reading the user's input: a prompt_toolkit prompt on a terminal, plain lines otherwise.

Both readers return one complete input per ``read()`` (a ``\"\"\"`` block spans several lines), raise
``EOFError`` when the user leaves (Ctrl+D, end of input) and ``Interrupted`` on Ctrl+C. The terminal
reader's ``set_history(False)`` (``/set nohistory``) stops saving inputs to the history file.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

from moeinf_cli.repl_commands import is_open_block

PROMPT = ">>> "
CONTINUATION = "... "
PLACEHOLDER = "Send a message (/? for help)"


class Interrupted(Exception):
    """Ctrl+C at the prompt; ``text`` is what had been typed (empty at an empty prompt)."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text)
        self.text = text


class Reader(Protocol):
    def read(self) -> str: ...


def file_history(path: Path) -> Any:
    """prompt_toolkit's FileHistory of ``path`` with a switch: while ``.enabled`` is False, inputs are
    still recalled with Up in this session but no longer appended to the file (Ollama's nohistory).
    A file that cannot be written (read-only or full disk) turns saving off, with one notice."""
    from prompt_toolkit.history import FileHistory

    class SwitchableFileHistory(FileHistory):
        enabled = True

        def store_string(self, string: str) -> None:
            if not self.enabled:
                return
            try:
                super().store_string(string)
            except OSError as err:
                self.enabled = False
                print(f"note: input history is not saved ({path}: {err.strerror or err})", file=sys.stderr)

        def load_history_strings(self):  # type: ignore[no-untyped-def]
            try:
                yield from super().load_history_strings()
            except (OSError, UnicodeDecodeError):
                return

    return SwitchableFileHistory(str(path))


class TerminalReader:
    """``>>> `` prompt with editing, history in ``history_path``, ``... `` on the lines of a ``\"\"\"`` block."""

    def __init__(self, history_path: Path) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.key_binding import KeyBindings

        with contextlib.suppress(OSError):  # a read-only home: the history is just not saved
            history_path.parent.mkdir(parents=True, exist_ok=True)
        bindings = KeyBindings()

        @bindings.add("enter")
        def _enter(event) -> None:  # Enter sends, except inside an open """ block
            buffer = event.current_buffer
            if is_open_block(buffer.text):
                buffer.insert_text("\n")
            else:
                buffer.validate_and_handle()

        @bindings.add("c-c")
        def _interrupt(event) -> None:
            event.app.exit(exception=Interrupted(event.current_buffer.text))

        def continuation(width: int, line_number: int, wrap_count: int) -> str:
            return CONTINUATION if wrap_count == 0 else ""

        self._history = file_history(history_path)
        self._session = PromptSession(
            history=self._history,
            multiline=True,
            key_bindings=bindings,
            prompt_continuation=continuation,
            placeholder=_placeholder,
            style=_style(),
            enable_open_in_editor=False,
        )

    def read(self) -> str:
        return self._session.prompt(PROMPT)

    def set_history(self, enabled: bool) -> None:
        """Whether the inputs from now on are appended to the history file."""
        self._history.enabled = enabled


def _placeholder():
    """The grey hint in an empty prompt; gone from the final screen once the prompt is done (Ctrl+D)."""
    from prompt_toolkit.application import get_app
    from prompt_toolkit.formatted_text import FormattedText

    return FormattedText([] if get_app().is_done else [("class:placeholder", PLACEHOLDER)])


def _style():
    from prompt_toolkit.styles import Style

    return Style.from_dict({"placeholder": "#888888", "prompt-continuation": ""})


class LineReader:
    """Inputs read line by line from a non-terminal stream (a pipe, a file); no prompt is printed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def read(self) -> str:
        line = self._stream.readline()
        if not line:
            raise EOFError
        text = line.rstrip("\n")
        while is_open_block(text):
            more = self._stream.readline()
            if not more:
                break  # an unclosed block at the end of the input is sent as it is
            text += "\n" + more.rstrip("\n")
        return text
