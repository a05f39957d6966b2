"""Streaming detokenisation never splits a UTF-8 character; stop strings across pieces."""

import json

import pytest
from tiny_models import make_tokenizer

from engine.runtime.detokenize import StreamDecoder
from engine.runtime.stops import StopScanner
from engine.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello 😀🎉 wörld, 你好世界! ñ€𝄞 done.",
    "👩‍👩‍👧‍👦 family 🇫🇷 flag",
    "plain ascii only",
    "ééééé ü 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return Tokenizer(d)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_reassembles_text_without_replacement_chars(tok, text):
    ids = tok.encode(text)
    single = [tok.decode([i]) for i in ids]
    if text != "plain ascii only":
        assert any("\ufffd" in s for s in single), "the test needs characters split over tokens"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_not_printed(tok):
    ids = tok.encode("<|im_start|>Hi<|im_end|></s>")
    assert ids[0] == 2
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    assert out == "Hi"


def test_flush_releases_incomplete_bytes(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1
    dec = StreamDecoder(tok)
    assert dec.push(ids[0]) == ""
    assert dec.flush() == "\ufffd"


def _scan(stops, pieces):
    sc = StopScanner(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = sc.push(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(sc.flush())
    return "".join(out), stopped, out


def test_stop_string_within_one_piece():
    assert _scan(["STOP"], ["abc STOP def"])[:2] == ("abc ", True)


def test_stop_string_across_pieces_is_not_printed():
    text, stopped, out = _scan(["</end>"], ["hello <", "/e", "nd", "> more"])
    assert (text, stopped) == ("hello ", True)
    assert "<" not in "".join(out)


def test_partial_match_is_released_when_it_fails():
    text, stopped, out = _scan(["</end>"], ["a <", "/x", " b"])
    assert (text, stopped) == ("a </x b", False)
    assert out[0] == "a "  # '<' held back until it is clear


def test_earliest_of_several_stops_wins_and_held_tail_flushes():
    assert _scan(["B", "AB"], ["xxAB"])[:2] == ("xx", True)
    assert _scan(["</end>"], ["tail </en"])[:2] == ("tail </en", False)
    assert _scan([], ["a", "b"])[:2] == ("ab", False)


class _SentencePieceLike:
    """A Metaspace (SentencePiece-style) BPE with byte fallback: the decoder drops the first token's
    leading space, and characters outside the vocabulary arrive as <0xNN> byte tokens."""

    def __init__(self):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
        spec = json.loads(tok.to_str())  # byte tokens are ordinary vocabulary entries, as in Llama's
        vocab = spec["model"]["vocab"]
        for i in range(256):
            vocab.setdefault(f"<0x{i:02X}>", len(vocab))
        self.tok = Tokenizer.from_str(json.dumps(spec))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("text", ["the quick brown fox", "the fox 😀 jumps über the dog", "日本 the lazy dog"])
def test_stream_with_metaspace_and_byte_fallback(text):
    tok = _SentencePieceLike()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0] == "" or not pieces[0].startswith(" ")  # the leading space of the first word is dropped
    assert " " in "".join(pieces[1:])  # later words keep theirs
