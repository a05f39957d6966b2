"""The model's tokenizer, special tokens and chat template, read from a store directory.

Files (as the store keeps them, beside each other): ``tokenizer.json`` (a ``tokenizers``
tokenizer: normaliser, pre-tokeniser, model, post-processor, decoder), ``tokenizer_config.json``
(named special tokens, possibly as ``{"content": ...}`` dicts; ``chat_template`` as a string or a
list of named templates), ``chat_template.jinja`` (transformers 5 writes the template there) and
``generation_config.json`` (``eos_token_id`` as an int or a list; ``bos_token_id``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.errors import MoeinfError
from engine.runtime.chat_template import render_chat_template

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MoeinfError(f"{path} is not valid JSON ({err}); pull the model again") from err


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _select_template(value: Any) -> str | None:
    """``chat_template`` may be a string, or a list of ``{"name", "template"}`` (the "default" is used)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    if isinstance(value, Mapping) and isinstance(value.get("default"), str):
        return value["default"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if isinstance(v, int)]


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD. Python turns bytes that are not UTF-8 in
    argv and stdin into surrogates (``surrogateescape``); JSON can spell them too. The tokenizer, like
    any UTF-8 encoder, refuses them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


class Tokenizer:
    """Encode/decode text and render the chat template of one model."""

    def __init__(self, model_root: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(model_root)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise MoeinfError(f"{root} has no tokenizer.json; pull the model again")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on a bad file
            raise MoeinfError(f"{path} could not be read ({err}); pull the model again") from err
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")

        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name))
            if text is not None:
                self.special_tokens[name] = text

        jinja = root / "chat_template.jinja"
        self.chat_template: str | None = (
            jinja.read_text(encoding="utf-8") if jinja.is_file() else _select_template(config.get("chat_template"))
        )

        self.bos_id: int | None = self._id_of(self.special_tokens.get("bos_token"))
        if self.bos_id is None and isinstance(generation.get("bos_token_id"), int):
            self.bos_id = generation["bos_token_id"]
        eos = _as_id_list(generation.get("eos_token_id"))
        own_eos = self._id_of(self.special_tokens.get("eos_token"))
        if own_eos is not None and own_eos not in eos:
            eos.append(own_eos)
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs tokenizer.json's post-processor (e.g. prepends
        BOS), as transformers 5's generic tokenizer does (it ignores ``add_bos_token`` in tokenizer_config).
        Bytes that were not UTF-8 (lone surrogates in ``text``) become U+FFFD."""
        return self._tok.encode(valid_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special added token (never printed)."""
        return int(token_id) in self._special_ids

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for ``messages`` (same as transformers' ``apply_chat_template(tokenize=False)``)."""
        if self.chat_template is None:
            raise MoeinfError("this model has no chat template; use raw mode (--raw)")
        return render_chat_template(
            self.chat_template, messages, self.special_tokens, add_generation_prompt=add_generation_prompt, **kwargs
        )
