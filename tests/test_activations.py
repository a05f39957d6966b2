"""The ``activations`` mode of float32 models on block formats (engine.formats.linear.ACTIVATIONS).

``float32``: the float32 kernels everywhere, never the int8 GEMM (the pre-existing path, bit for bit:
the int8 kernel is never entered and the logits do not move when it is made to fail). ``auto``: the
prompt (a multi-token forward) rounds the activations to int8 per block, one-token decode does not;
its prompt logits stay within the rounding's reach of the float32 ones and greedy tokens agree.
``int8``: decode too. The bound at the model level: every matrix product moves by at most
sum_j |w_j| d_x(j) / 2 (cuda_ext.quant), at most 1/254 of sum_j |x_j w_j| per product, which is
sqrt(K)-fold the product itself for random signs; through a tiny random model's two layers (its norm
weights 0.5-1.5), an 80-token prompt and the LM head that stays under ``REL`` of the largest logit
(measured 5.5% on the q8_0 model and 14% on the q4_k one; 2.5% and 6.9% on a 13-token prompt, about
the same with blocks of 32 for q4_k; on the float32 model's routing: a near tie that the rounding
flips sends a token to another expert, which no bound on the products covers). These random models
amplify errors far more than trained ones; the products' own bound is tests/test_cuda_ext_qgemm.py's."""

from __future__ import annotations

import pytest
import torch
from gguf_testlib import write_gguf
from test_formats_fidelity import _model
from tiny_models import make_tokenizer

import cuda_ext.quant
from cuda_ext import loader
from engine.errors import MoeinfError
from engine.model.loader import load_model
from engine.store.pull import pull_model

REL = 0.25  # |auto - float32| <= REL * max|float32 logit| on the prompt (measured 5.5% q8_0, 14% q4_k)
PROMPT = [0, 5, 17, 99, 3, 44, 7, 12, 60, 2, 81, 33, 9]
# long enough that the 32-value formats' products reach cuda_ext.quant.AUTO_MIN_ROWS (experts included)
LONG = [(7 * i + 3) % 120 for i in range(80)]


@pytest.fixture(scope="module", params=[("q8_0", "Q8_0", 96, 160), ("q4_k", "Q4_K", 256, 256)], ids=["q8_0", "q4_k"])
def pulled(request, tmp_path_factory):
    fmt, gtype, hidden, inter = request.param
    tmp = tmp_path_factory.mktemp(fmt)
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEINF_HOME", str(tmp / "home"))
    make_tokenizer(tmp / "tok")
    model = _model(hidden, inter, seed=hidden + inter)
    path = write_gguf(model, "mixtral", tmp / "tok", tmp / "m.gguf", quantize=("ffn_", "attn_"), qtype=gtype)
    out = pull_model(str(path), name="q").path
    yield out
    mp.undo()


def _needs_kernels():
    if loader.cpu() is None:
        pytest.skip("no native kernels")


def _greedy(model, prompt: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    logits = model(torch.tensor(prompt), 0)
    first, pos, out = logits, len(prompt), []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = model(torch.tensor([out[-1]]), pos)
        pos += 1
    return first, out


def test_float32_never_takes_the_int8_kernel(pulled, monkeypatch):
    _needs_kernels()
    model = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="float32")
    before, before_tokens = _greedy(model, PROMPT, 8)

    def refuse(*args, **kwargs):
        raise AssertionError("the int8 GEMM ran under activations='float32'")

    monkeypatch.setattr(cuda_ext.quant, "qgemm", refuse)
    after, after_tokens = _greedy(model, PROMPT, 8)
    assert torch.equal(before, after) and before_tokens == after_tokens


def _forced_routing(model, recorded: list) -> None:
    """Each MoE layer's router replays ``recorded`` (the float32 model's (weights, ids) per call, in
    order), so a near tie that the rounding flips does not send a token to another expert."""
    calls = iter(recorded)
    for layer in model.layers:
        layer.mlp.gate.forward = lambda x, calls=calls: next(calls)


def _recording(model) -> list:
    recorded: list = []
    for layer in model.layers:
        forward = layer.mlp.gate.forward

        def run(x, forward=forward):
            out = forward(x)
            recorded.append(out)
            return out

        layer.mlp.gate.forward = run
    return recorded


def test_auto_rounds_the_prompt_only(pulled, monkeypatch):
    _needs_kernels()
    f32 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="float32")
    auto = load_model(pulled, dtype=torch.float32, max_seq_len=128)  # the default is auto
    assert auto.activations == "auto"
    # the prompt, on the float32 model's routing: within the rounding's reach of the float32 logits
    recorded = _recording(f32)
    ref = f32(torch.tensor(LONG), 0)
    _forced_routing(auto, recorded)
    ours = auto(torch.tensor(LONG), 0)
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert 0 < diff <= REL * scale, (diff, scale)  # rounded (not the float32 path), within reach
    print(f"prompt logits, auto against float32: {diff / scale:.4f} of max|logit|")
    # greedy tokens on their own routing: the first where the float32 margin is clear, and most after
    f32 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="float32")
    auto = load_model(pulled, dtype=torch.float32, max_seq_len=128)
    ref, ref_tokens = _greedy(f32, LONG, 8)
    _, our_tokens = _greedy(auto, LONG, 8)
    top2 = ref[-1].topk(2).values
    if (top2[0] - top2[1]).item() > 2 * REL * scale:
        assert our_tokens[0] == ref_tokens[0]
    if fmt_of(pulled) in cuda_ext.quant.AUTO_INT8_FORMATS:  # decode rounded too: activations="int8"'s tokens
        int8 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="int8")
        assert our_tokens == _greedy(int8, LONG, 8)[1]
    else:
        assert our_tokens[:4] == ref_tokens[:4], (our_tokens, ref_tokens)  # measured: the first 5 of 8
    # one-token forwards: float32 on the 32-value formats (the same bits as the float32 model, from an empty
    # cache); on the k-quants (cuda_ext.quant.AUTO_INT8_FORMATS) int8 as activations="int8" rounds them
    one_f32 = f32(torch.tensor([PROMPT[0]]), 0)
    one_auto = auto(torch.tensor([PROMPT[0]]), 0)
    kquant = fmt_of(pulled) in cuda_ext.quant.AUTO_INT8_FORMATS
    if kquant:
        int8 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="int8")
        assert torch.equal(one_auto, int8(torch.tensor([PROMPT[0]]), 0))
        diff = (one_auto - one_f32).abs().max().item()
        assert 0 < diff <= REL * one_f32.abs().max().item()
    else:
        assert torch.equal(one_f32, one_auto)
    calls = []
    real = cuda_ext.quant.qgemm
    monkeypatch.setattr(cuda_ext.quant, "qgemm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    auto(torch.tensor(LONG), 0)
    assert calls  # the prompt's products went through the int8 GEMM
    calls.clear()
    auto(torch.tensor([PROMPT[0]]), 0)
    assert kquant or not calls  # (the k-quants' one token: the int8 experts call, shown equal above)


def fmt_of(path) -> str:
    """The block format of the pulled model's experts (the fixture's q8_0 or q4_k)."""
    import json

    formats = set(json.loads((path / "manifest.json").read_text())["formats"]["experts"].values())
    assert len(formats) == 1, formats
    return formats.pop()


def test_int8_rounds_decode_too(pulled):
    _needs_kernels()
    f32 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="float32")
    int8 = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="INT8")
    assert int8.activations == "int8"
    a, b = f32(torch.tensor([PROMPT[0]]), 0), int8(torch.tensor([PROMPT[0]]), 0)
    diff = (a - b).abs().max().item()
    assert 0 < diff <= REL * a.abs().max().item()  # the experts (and block-format LM head) rounded


def test_unknown_mode_is_a_one_line_error(pulled):
    with pytest.raises(MoeinfError, match="activations must be one of auto, float32, int8"):
        load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="int4")


def test_pytorch_path_ignores_the_mode(pulled, monkeypatch):
    """Without the native kernels every mode is the PyTorch path (dequantise, then multiply)."""
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", "0")
    loader.reset()
    try:
        a = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="float32")(torch.tensor(PROMPT), 0)
        b = load_model(pulled, dtype=torch.float32, max_seq_len=128, activations="auto")(torch.tensor(PROMPT), 0)
    finally:
        monkeypatch.undo()
        loader.reset()
    assert torch.equal(a, b)
