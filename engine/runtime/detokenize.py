"""Streaming detokenisation that never splits a UTF-8 character.

A byte-level BPE may spread one character (an emoji, a CJK ideograph) over several tokens; decoding
them one at a time would print replacement characters. ``StreamDecoder`` decodes a small window of
recent tokens and releases only text that is final: new text is withheld while the window's decode
ends in U+FFFD (an incomplete byte sequence). The window starts at the previous emission point, so
decoders that strip a leading space from the first token (SentencePiece's Metaspace) stay right.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class _Decodes(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class StreamDecoder:
    """Feed token ids one at a time with ``push``; it returns the text that is now complete."""

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; the newly completed text ('' while a character is still incomplete)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (incomplete bytes decode as U+FFFD); resets the window."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
