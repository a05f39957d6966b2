"""Streaming an answer to the terminal as it comes, word-wrapped like Ollama's, or as plain text.

``AnswerWriter.write(piece)`` is called with every piece the model yields; on a terminal whole words
move to the next line instead of being cut at the edge (``width``) and control characters are shown
instead of obeyed (``sanitize``); otherwise the text goes out as is.
"""

from __future__ import annotations

from typing import TextIO

from rich.cells import cell_len

# Control characters a model may emit (ESC, CR, BEL, C1 controls) would drive the terminal instead of
# showing: on a terminal they are shown as Unicode control pictures (ESC -> U+241B) or U+FFFD.
CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t"}
CONTROL_PICTURES[0x7F] = 0x2421
CONTROL_PICTURES.update({c: 0xFFFD for c in range(0x80, 0xA0)})


def visible(text: str) -> str:
    """``text`` with terminal control characters (all but newline and tab) replaced by visible ones."""
    return text.translate(CONTROL_PICTURES)


class AnswerWriter:
    """Writes streamed text to ``stream``, wrapping at word boundaries when ``width`` is given."""

    def __init__(self, stream: TextIO, width: int | None = None, sanitize: bool = False) -> None:
        self.stream = stream
        self.sanitize = sanitize
        self.width = width if width and width > 1 else None
        self.column = 0
        self._word = ""
        self._spaces = ""
        self.text = ""

    def write(self, piece: str) -> None:
        """Emit ``piece`` (its complete words at once; a word still growing waits for its end)."""
        self.text += piece
        if self.sanitize:
            piece = visible(piece)
        if self.width is None:
            self._emit(piece)
            self.stream.flush()
            return
        for ch in piece:
            if ch == "\n":
                self._flush_word()
                self._spaces = ""
                self._emit("\n")
            elif ch in " \t":
                self._flush_word()
                self._spaces += ch
            else:
                self._word += ch
        self.stream.flush()

    def finish(self) -> None:
        """Emit what is left and end the line (called after the answer, or after Ctrl+C)."""
        self._flush_word()
        if self.column > 0:
            self._emit("\n")
        self.stream.flush()

    def _flush_word(self) -> None:
        if not self._word:
            return
        word, self._word = self._word, ""
        assert self.width is not None
        spaces, self._spaces = self._spaces.expandtabs(4), ""
        if self.column > 0 and self.column + len(spaces) + cell_len(word) > self.width:
            self._emit("\n")  # the spaces at the break are dropped
        elif self.column + len(spaces) < self.width:
            self._emit(spaces)  # between words, or indentation at the start of a line
        while cell_len(word) > self.width - self.column:  # a word longer than the line: cut it
            cut = self._fit(word, self.width - self.column)
            self._emit(word[:cut] + "\n")
            word = word[cut:]
        self._emit(word)

    @staticmethod
    def _fit(word: str, cells: int) -> int:
        n = 0
        while n < len(word) and cell_len(word[: n + 1]) <= cells:
            n += 1
        return max(n, 1)

    def _emit(self, text: str) -> None:
        self.stream.write(text)
        if "\n" in text:
            self.column = cell_len(text.rsplit("\n", 1)[1])
        else:
            self.column += cell_len(text)
