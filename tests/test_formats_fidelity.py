"""Quantised models, kept in their block formats, against transformers on the same dequantised weights.

Per format, tiny Mixtral-shaped models of several shapes (hidden and expert sizes that are odd
multiples of the block) are written as GGUF files whose expert and attention matrices are in that
format (quantised by the gguf package where it can, else by moeinf), pulled by moeinf (which keeps
the blocks as they are) and run from the blocks. The reference is transformers on the checkpoint the
gguf package's reference dequantiser makes of the same file. A gpt-oss checkpoint with MXFP4
experts, kept as MXFP4, is checked against transformers on the repository's MXFP4 reference
dequantisation (``engine.store.quant.dequant_mxfp4``, equal to transformers' own).

Bound: unpacking is bit-exact against the reference dequantiser (tests/test_formats.py), so both
sides compute the same float32 function of the same weights and differ only by summation order.
A float32 dot product of length n summed in another order differs by at most n u (the unit roundoff
u = 2^-24) times the sum of its terms' magnitudes, so the logits may differ by about that relative to
their size: the bound is ``2 n u max|logit|`` with n the model's longest reduction (its hidden or
expert size; at least the float tests' 1e-4). Measured: up to 1.2e-5 of max|logit| at n = 256 on an
AMD EPYC (the bound there is 3.1e-5), 3e-6 at n = 96..224. Greedy tokens (prefill, then token by
token over the KV cache) are identical for 32 steps wherever the reference's top-2 margin exceeds
twice the bound. The models run with ``activations="float32"`` (the contract checked here: no
activation rounded); the int8 prompt path has its own bound (tests/test_activations.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from gguf_testlib import write_gguf
from tiny_models import NUM_EXPERTS, TOP_K, _common, _randomise, make_tokenizer

from engine.formats.tensor import QuantTensor
from engine.model.experts import load_expert
from engine.model.loader import load_model
from engine.store.gguf import gguf_to_checkpoint
from engine.store.opened import as_store_model
from engine.store.pull import pull_model

LOGIT_BOUND = 1e-4  # the floor of the bound (the float fidelity tests' bound)
UNIT_ROUNDOFF = 2.0**-24
STEPS = 32
SHAPES = {  # format -> (hidden, expert intermediate) pairs; GGUF type name
    "q8_0": ("Q8_0", [(96, 160), (64, 224)]),
    "q4_0": ("Q4_0", [(96, 160)]),
    "q4_1": ("Q4_1", [(160, 96), (64, 224)]),
    "mxfp4": ("MXFP4", [(96, 160)]),
    "q4_k": ("Q4_K", [(256, 256)]),
    "q5_k": ("Q5_K", [(256, 256)]),
    "q6_k": ("Q6_K", [(256, 256)]),
}
CASES = [(fmt, shape) for fmt, (_, shapes) in SHAPES.items() for shape in shapes]
MEASURED: dict[str, float] = {}


def _model(hidden: int, inter: int, seed: int):
    cfg = _common("mixtral") | {"hidden_size": hidden, "num_attention_heads": 4, "num_key_value_heads": 2}
    experts = (
        NUM_EXPERTS if hidden * inter < 65536 else 4
    )  # the wide k-quant shapes: fewer experts to quantise
    config = tf.MixtralConfig(
        **cfg,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_local_experts=experts,
        num_experts_per_tok=TOP_K,
    )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _greedy_ours(model, prompt: list[int], n: int) -> list[int]:
    logits = model(torch.tensor(prompt), 0)
    pos, out = len(prompt), []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = model(torch.tensor([out[-1]]), pos)
        pos += 1
    return out


def _bound(ref_logits: torch.Tensor, n: int) -> float:
    """How far float32 logits may move when every sum of up to n terms is taken in another order."""
    return max(LOGIT_BOUND, 2 * n * UNIT_ROUNDOFF * ref_logits.abs().max().item())


def _check(ours_model, ref, prompt: list[int], n: int) -> float:
    """Largest |logit difference| over a greedy continuation, as a fraction of the bound for sums of up
    to n terms; asserts it is below the bound and that the greedy tokens agree."""
    with torch.no_grad():
        gen = ref.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            eos_token_id=[],
            pad_token_id=4,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
        seq = gen[0].tolist()
        ref_logits = ref(torch.tensor([seq])).logits[0]
    ours_logits = ours_model(torch.tensor(seq), 0)
    diff = (ours_logits - ref_logits).abs().max().item()
    bound = _bound(ref_logits, n)
    assert diff < bound, (diff, bound)
    ours = _greedy_ours(ours_model, prompt, STEPS)
    top2 = ref_logits.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    for step in range(STEPS):
        if ours[step] != seq[len(prompt) + step]:
            assert margin[len(prompt) - 1 + step] <= 2 * bound, f"step {step} differs at a clear margin"
            break  # the sequences may part after a near tie
    assert len(set(seq[len(prompt) :])) > 4, "degenerate reference"
    return diff / bound


@pytest.mark.parametrize(("fmt", "shape"), CASES, ids=[f"{f}-{h}x{i}" for f, (h, i) in CASES])
def test_quantised_gguf_model_matches_transformers(tmp_path, monkeypatch, fmt, shape):
    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    hidden, inter = shape
    gtype = SHAPES[fmt][0]
    model = _model(hidden, inter, seed=hidden + inter)
    make_tokenizer(tmp_path / "tok")
    path = write_gguf(
        model, "mixtral", tmp_path / "tok", tmp_path / "m.gguf", quantize=("ffn_", "attn_"), qtype=gtype
    )

    pulled = pull_model(str(path), name="q")
    m = pulled.manifest
    assert m["formats"]["experts"] == dict.fromkeys(
        ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), fmt
    )
    assert m["formats"]["dense"]["model.layers.0.self_attn.q_proj.weight"] == fmt
    weights, stored = load_expert(as_store_model(pulled.path), 0, 0, torch.float32, torch.device("cpu"))
    assert isinstance(weights.gate, QuantTensor) and weights.gate.format.name == fmt
    per_weight = 8 * stored / (3 * hidden * inter)
    assert per_weight == weights.gate.format.bits_per_weight  # the expert is stored at the format's bits

    ckpt = gguf_to_checkpoint(path, tmp_path / "ref", "float32")  # the gguf package's dequantisation
    ref = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = load_model(pulled.path, dtype=torch.float32, max_seq_len=128, activations="float32")
    assert isinstance(ours.layers[0].self_attn.q_proj.weight, QuantTensor)
    prompts = ([0, 5, 17, 99, 3], [0, *range(40, 51)]) if shape == SHAPES[fmt][1][0] else ([0, 7, 3, 21],)
    diffs = [_check(ours, ref, prompt, max(hidden, inter)) for prompt in prompts]
    MEASURED[f"{fmt} {hidden}x{inter}"] = max(diffs)


def test_gpt_oss_mxfp4_experts_kept_match_transformers(tmp_path, monkeypatch):
    """gpt-oss ships MXFP4 experts: pulled as they are, run from the blocks, against transformers on
    the MXFP4 reference dequantisation of the same blocks."""
    from safetensors.torch import save_file
    from tiny_models import checkpoint_tensors, make_tiny_checkpoint

    from engine.store.quant import dequant_mxfp4

    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    src = make_tiny_checkpoint("gpt_oss", tmp_path / "src")
    tensors = checkpoint_tensors(src)
    ref_tensors = dict(tensors)
    gen = torch.Generator().manual_seed(3)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, cols, rows = tensors[name].shape  # transformers' [E, in, out]
        blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.int32).to(
            torch.uint8
        )
        scales = torch.randint(119, 124, (e, rows, cols // 32), generator=gen, dtype=torch.int32).to(
            torch.uint8
        )
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        ref_tensors[name] = dequant_mxfp4(blocks, scales, torch.float32)
    for f in src.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (ref_dir / f.name).write_bytes(f.read_bytes())
    save_file(ref_tensors, str(ref_dir / "model.safetensors"))
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn"],
    }
    (src / "config.json").write_text(json.dumps(cfg))

    pulled = pull_model(str(src), name="oss")
    assert pulled.manifest["formats"]["experts"]["gate_proj.weight"] == "mxfp4"
    ours = load_model(pulled.path, dtype=torch.float32, max_seq_len=128, activations="float32")
    ref = tf.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
    n = max(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"] * cfg.get("head_dim", 0))
    MEASURED["mxfp4 gpt-oss"] = _check(ours, ref, [0, 5, 17, 99, 3, 44, 7], n)


def test_report_measured_bounds():
    """Prints the largest logit difference per format as a fraction of its bound (run with -s to see it)."""
    for key, value in sorted(MEASURED.items()):
        print(f"{key}: max |logit diff| {value:.2f} of the bound")
