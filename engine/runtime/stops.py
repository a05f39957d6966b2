"""Stop strings over a stream of text pieces.

A stop string may arrive split over several pieces, so text that could be the start of one is held
back until it is clear. When a stop string appears, the text before it is released and the stream
ends; the stop string itself is never released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopScanner:
    """``push(piece) -> (text to release, stopped)``; ``flush()`` releases what is held at the end."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = self._held_suffix_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
