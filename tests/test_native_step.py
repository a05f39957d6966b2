"""The native decode step over every layer (engine/model/native_step.py, cuda_ext/csrc/cpu/step.c) gives
the same bits as the layers called one by one, with the expert source's hooks (routing observed, hits
counted) as if fetched, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import loader
from engine import formats
from engine.bench.synthetic import make_synthetic_model
from engine.formats.tensor import QuantTensor
from engine.memory.open import open_experts
from engine.model.loader import load_model

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler for the native kernels")


def _decode(model, prompt, steps):
    model.forward(prompt, 0)
    tok, logits = prompt[-1:], []
    for i in range(steps):
        out = model.forward(tok, len(prompt) + i)
        logits.append(out)
        tok = out[-1:].argmax(-1)
    return torch.cat(logits)


class Recorder:
    def __init__(self):
        self.routes = []

    def on_route(self, layer, ids):
        self.routes.append((layer, ids.tolist()))


def _dense_mlp(hidden, inter):
    from engine.model.layers.mlp import MLP

    torch.manual_seed(5)
    mlp = MLP(hidden, inter)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return mlp.bfloat16()


def _touch_experts(model):
    """Every expert loaded (the all-resident source offers them to the step once all were used)."""
    for layer in model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            list(mlp.experts.fetch(mlp.layer_idx, list(range(mlp.gate.weight.shape[0]))))


def _run_watched(root, dtype, native, prompt, prepare, max_seq_len):
    """One decode of the model at ``root`` (all experts resident; ``prepare(model)`` first) with the native
    step on or off: (logits, the recorder's routes, the source's stats, each observe's layer and router
    input), and the model."""
    rec = Recorder()
    source = open_experts(root, dtype, "cpu", budget=None, recorder=rec)
    model = load_model(root, dtype=dtype, experts=source, max_seq_len=max_seq_len)
    prepare(model)
    model.native_step = native
    seen, observe = [], source.observe

    def watch(layer, ids, hidden):
        seen.append((layer, hidden.clone()))
        return observe(layer, ids, hidden)

    source.observe = watch
    logits = _decode(model, prompt, 12)
    return (logits, rec.routes, source.stats(), seen), model


def _assert_same_runs(runs):
    (a, routes_a, st_a, seen_a), (b, routes_b, st_b, seen_b) = runs
    assert torch.equal(a, b)
    assert routes_a == routes_b  # the recorder saw every layer's routing, in order
    assert [layer for layer, _ in seen_a] == [layer for layer, _ in seen_b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(seen_a, seen_b, strict=True))  # the router inputs
    assert (st_a.accesses, st_a.hits, st_a.layer_hits) == (st_b.accesses, st_b.hits, st_b.layer_hits)


@pytest.mark.parametrize(
    "family,experts,top_k",
    [("qwen3_moe", 16, 4), ("mixtral", 8, 2), ("olmoe", 8, 3), ("gpt_oss", 8, 2), ("deepseek_v3", 16, 4)],
)
def test_native_step_is_the_layers_one_by_one(family, experts, top_k):
    """gpt-oss: sinks, biases, sliding and full layers (window 128: the decode runs past it), float32-weight
    norms, the top-k-then-softmax router and the clamped SwiGLU experts with biases. DeepSeek-V3: latent
    attention, the grouped sigmoid router, a shared expert, and a dense first layer (put in here: the
    synthetic model's layers are all sparse)."""
    root = make_synthetic_model(f"step-{family}", family, num_layers=3, num_experts=experts, top_k=top_k,
                                hidden=128, intermediate=96, vocab=300, head_dim=32, kv_heads=2, heads=4)
    prompt = torch.arange(1, 130) % 290 + 3 if family == "gpt_oss" else torch.tensor([1, 17, 40, 99, 7, 23])

    def prepare(model):
        if family == "deepseek_v3":
            model.layers[0].mlp = _dense_mlp(128, 160)
        _touch_experts(model)

    runs = []
    for native in (True, False):
        run, model = _run_watched(root, torch.bfloat16, native, prompt, prepare, 160)
        assert (model._step is not False and model._step is not None) == native
        runs.append(run)
    _assert_same_runs(runs)


def _quantise_experts(model, fmt):
    """Every routed expert's matrices packed into block format ``fmt``, in place on the cached weights."""
    for layer in model.layers:
        mlp = layer.mlp
        for _, w in mlp.experts.fetch(mlp.layer_idx, list(range(mlp.gate.weight.shape[0]))):
            for attr in ("gate", "up", "down"):
                setattr(w, attr, QuantTensor.quantise(getattr(w, attr).float(), formats.get(fmt)))
    model._step = False


@pytest.mark.parametrize("fmt,top_k", [("q4_0", 3), ("q8_0", 4)])
def test_native_step_on_block_format_experts_is_the_layers_one_by_one(fmt, top_k):
    """bf16 activations on experts kept in a block format (short rows here: quant_f32.c's float32 rows): the step takes them
    (three experts on two threads: two whole, the third by rows) with the same bits as the layers."""
    root = make_synthetic_model(f"step-{fmt}", "qwen3_moe", num_layers=2, num_experts=8, top_k=top_k,
                                hidden=128, intermediate=96, vocab=300, head_dim=32, kv_heads=2, heads=4)
    prompt = torch.tensor([1, 17, 40, 99, 7, 23])
    runs = []
    for native in (True, False):
        model = load_model(root, dtype=torch.bfloat16, max_seq_len=32)
        _touch_experts(model)
        _quantise_experts(model, fmt)
        model.native_step = native
        runs.append(_decode(model, prompt, 8))
        if native:
            assert model._step is not None and model._step is not False
            assert all(s.type == formats.get(fmt).ggml_type for s in model._step.layers.array)
    assert torch.equal(runs[0], runs[1])


def _block_weight(linear, fmt):
    w = linear.weight.detach().float()
    del linear.weight
    linear.weight = QuantTensor.quantise(w, formats.get(fmt))


def _gguf_like(model, attn_fmts, gate_fmt, down_fmts, dense_fmt):
    """A float32 model as a GGUF gives it: attention and experts in block formats (the down matrices in a
    format of their own per layer, as Q4_K_M's q6_k ffn_down), and layer 0's MoE block replaced by a
    dense SiLU MLP in ``dense_fmt``."""
    for layer, down_fmt in zip(model.layers, down_fmts, strict=True):
        attn = layer.self_attn
        for proj, fmt in zip((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj), attn_fmts, strict=True):
            _block_weight(proj, fmt)
        attn._plan = attn._plan_f32 = False
        mlp = layer.mlp
        for _, w in mlp.experts.fetch(mlp.layer_idx, list(range(mlp.gate.weight.shape[0]))):
            for attr, fmt in (("gate", gate_fmt), ("up", gate_fmt), ("down", down_fmt)):
                setattr(w, attr, QuantTensor.quantise(getattr(w, attr).float(), formats.get(fmt)))
    hidden = model.args.hidden_size
    dense = _dense_mlp(hidden, 256).float()
    for proj in (dense.gate_proj, dense.up_proj, dense.down_proj):
        _block_weight(proj, dense_fmt)
    model.layers[0].mlp = dense
    model._step = False


@pytest.mark.parametrize(
    "family,activations", [("mixtral", "auto"), ("mixtral", "float32"), ("mixtral", "int8"), ("qwen3_moe", "auto")]
)
def test_native_step_on_a_float32_gguf_model_is_the_layers_one_by_one(family, activations):
    """A float32 model with block-format attention (q4_k q, q8_0 k/v, q5_k o; Qwen3's per-head q/k norms)
    and experts (q4_k gate/up, q6_k or q4_k down), a dense q4_1 layer: the float32 step (float32 router,
    attention_f32, float32 or int8 experts as the mode says) gives the layers' bits, routing, router inputs
    and hit counts."""
    root = make_synthetic_model(f"step-f32-{family}", family, num_layers=3, num_experts=8, top_k=2, hidden=256,
                                intermediate=256, vocab=300, head_dim=64, kv_heads=2, heads=4)
    prompt = torch.tensor([1, 17, 40, 99, 7, 23])

    def prepare(model):
        model.activations = activations
        _gguf_like(model, ("q4_k", "q8_0", "q8_0", "q5_k"), "q4_k", ("q4_k", "q6_k", "q4_k"), "q4_1")

    runs = []
    for native in (True, False):
        run, model = _run_watched(root, torch.float32, native, prompt, prepare, 64)
        if native:
            assert model._step is not None and model._step is not False, "the float32 step did not apply"
            assert model._step.layers.topk == [0, 2, 2]
        runs.append(run)
    _assert_same_runs(runs)


def test_native_step_steps_aside_under_a_budget_and_for_float32():
    root = make_synthetic_model("step-aside", "qwen3_moe", num_layers=2, num_experts=8, top_k=2, hidden=128,
                                intermediate=64, vocab=300, head_dim=32)
    cached = open_experts(root, torch.bfloat16, "cpu", budget="50%")
    model = load_model(root, dtype=torch.bfloat16, experts=cached, max_seq_len=32)
    _decode(model, torch.tensor([1, 2, 3]), 3)
    assert model._step is None  # the cache's fetch decides what is loaded: the layers run one by one
    model32 = load_model(root, dtype=torch.float32, max_seq_len=32)
    _decode(model32, torch.tensor([1, 2, 3]), 3)
    assert model32._step is None  # float32 weights, not blocks: no native float32 attention


def test_native_step_steps_aside_for_a_wrapped_router(tmp_path, monkeypatch):
    """A replay's forced routing wraps each router (``engine.bench.forced``): the step does not apply
    (the layers one by one follow the forced routing), and nothing fails on the wrapper."""
    import numpy as np

    from engine.bench.forced import force_routing
    from engine.trace.format import RoutingTrace

    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    root = make_synthetic_model("step-forced", "qwen3_moe", num_layers=2, num_experts=8, top_k=2, hidden=128,
                                intermediate=64, vocab=300, head_dim=32)
    model = load_model(root, dtype=torch.bfloat16, max_seq_len=32)
    _touch_experts(model)
    ids = np.tile(np.array([[[1, 2], [3, 4]]], dtype=np.int64), (16, 1, 1))  # [T, L, k]
    force_routing(model, RoutingTrace(ids, num_experts=8))
    _decode(model, torch.tensor([1, 2, 3]), 3)
    assert model._step is None


def test_profile_times_the_native_steps_parts():
    """``cuda_ext.step.Profile`` (decode_step_breakdown.py's native split): while it holds, each native step
    adds its attention, router, experts and rest seconds, which sum to less than the wall time; after it,
    nothing more is added, and the bits do not change."""
    import time

    from cuda_ext import step as native_step

    root = make_synthetic_model("step-profile", "qwen3_moe", num_layers=2, num_experts=8, top_k=2, hidden=128,
                                intermediate=64, vocab=300, head_dim=32)
    model = load_model(root, dtype=torch.bfloat16, max_seq_len=32)
    _touch_experts(model)
    prompt = torch.tensor([1, 2, 3])
    plain = _decode(model, prompt, 4)
    with native_step.Profile() as prof:
        t0 = time.perf_counter()
        profiled = _decode(model, prompt, 4)
        wall = time.perf_counter() - t0
    assert model._step is not None and model._step is not False
    assert torch.equal(plain, profiled)
    seconds = prof.seconds
    assert set(seconds) == {"attention", "router", "experts", "rest"}
    assert all(seconds[name] > 0 for name in ("attention", "router", "experts"))
    assert sum(seconds.values()) < wall
    _decode(model, prompt, 2)
    assert prof.seconds == seconds
