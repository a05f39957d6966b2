"""The tokenizer a GGUF file describes in its metadata, rebuilt as Hugging Face ``tokenizer.json``.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary (``tokenizer.ggml.tokens``),
the merges or the token scores, each token's type (1 normal, 2 unknown, 3 control, 4 user-defined,
6 byte) and the special token ids, plus a name for the pre-tokenizer (``tokenizer.ggml.pre``).
Two kinds are rebuilt, as transformers' GGUF loader builds them:

* byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM, Llama 3, Qwen, ...): tokens already
  spelled in GPT-2's byte alphabet, merges stored, a split regex picked by the pre-tokenizer name;
* SentencePiece BPE (``"llama"``: Llama 2, Mistral, Mixtral): "▁" for spaces, byte fallback
  (``<0x0A>``), merges stored or derived from the scores, BOS added by default.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from engine.errors import MoeinfError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) whose split regex differs from GPT-2's.
_SPLIT_REGEX = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-tokenizers that split every digit on its own before GPT-2's regex (SmolLM, StarCoder).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE tokens are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def add_bos_token(meta: dict[str, Any]) -> bool:
    """Whether BOS is prepended: the file's flag, else llama.cpp's default (yes for SentencePiece)."""
    flag = meta.get("tokenizer.ggml.add_bos_token")
    return bool(flag) if flag is not None else meta.get("tokenizer.ggml.model") == "llama"


def _bos_post_processor(tok: Tokenizer, meta: dict[str, Any], tokens: list[str]) -> None:
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos_token(meta) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )


def _added_tokens(tok: Tokenizer, tokens: list[str], types: list[int], vocab: dict[str, int],
                  alphabet: set[str] | None) -> None:
    """Control tokens stay whole and are special; a "control" token outside the byte alphabet is a
    llama.cpp mislabel and is left alone. User-defined tokens are matched whole but not special."""
    special = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types, strict=False)
        if ty == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if special:
        tok.add_special_tokens(special)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty == TOKEN_TYPE_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary: every split of a token into two tokens,
    best-scored merged token first (transformers' ``generate_merges``)."""
    merges: list[tuple[str, str, float]] = []
    for merged, score in scores.items():
        local = [(merged[:i], merged[i:], score) for i in range(1, len(merged))
                 if merged[:i] in vocab and merged[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores:
            raise MoeinfError("this GGUF's SentencePiece tokenizer has neither merges nor scores; the file is incomplete")
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=False)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                               unk_token=tokens[int(unk_id)] if unk_id is not None else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    _added_tokens(tok, tokens, types, vocab, None)
    _bos_post_processor(tok, meta, tokens)
    return tok


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to the one the GGUF metadata ``meta`` describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(meta)
    if kind != "gpt2":
        raise MoeinfError(
            f"GGUF tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' and SentencePiece 'llama' are); "
            "pull the model's Hugging Face repository instead"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    alphabet = set(bytes_to_unicode().values())
    spelling = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # a token llama.cpp stored as raw text: respell its bytes
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False)
    )
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    _added_tokens(tok, tokens, types, vocab, alphabet)
    _bos_post_processor(tok, meta, tokens)
    return tok


def _token(meta: dict[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None


def tokenizer_config(meta: dict[str, Any], context_length: int | None) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags and the chat template."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "add_bos_token": add_bos_token(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        cfg["model_max_length"] = int(context_length)
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """Every end-of-generation id the file names (EOS, end-of-turn, end-of-message), deduplicated."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids
