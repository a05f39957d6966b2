"""MXFP4 (gpt-oss) and block-FP8 (DeepSeek-V3) sources are dequantised at pull, as transformers does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import checkpoint_tensors, make_tiny_checkpoint
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from engine import formats
from engine.formats import storage
from engine.formats.tensor import QuantTensor
from engine.store.paths import expert_shard_path
from engine.store.pull import pull_model
from engine.store.quant import dequant_fp8_blocks, dequant_mxfp4


def _random_mxfp4(shape_rows: tuple[int, int], cols: int, gen: torch.Generator):
    e, rows = shape_rows
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(121, 131, (e, rows, cols // 32), generator=gen, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4((3, 40), 96, gen)
    ours = dequant_mxfp4(blocks, scales, dtype)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == (3, 96, 40) and ours.dtype == dtype
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(("shape", "block"), [((200, 300), (128, 128)), ((48, 64), (32, 32)), ((2, 96, 40), (32, 16))])
def test_fp8_block_dequant_matches_transformers(shape, block):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=gen) * 100).to(torch.float8_e4m3fn)
    sshape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    s = torch.rand(sshape, generator=gen) * 0.01 + 1e-4
    ours = dequant_fp8_blocks(w, s, block, torch.bfloat16)
    ref = _dequantize_fp8_weight(w.clone(), s, list(block), torch.float32).to(torch.bfloat16)
    assert torch.equal(ours, ref)


def _stored(path) -> dict:
    """Every tensor of a store shard as stored (block-quantised ones as QuantTensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kept = storage.read_formats(f.metadata())
        return {k: storage.as_stored(k, f.get_tensor(k), kept) for k in f.keys()}


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_pull_gpt_oss_mxfp4_checkpoint(tmp_path, dtype):
    """Kept as mxfp4 by default (the same values, regrouped); dequantised when --dtype asks."""
    src = make_tiny_checkpoint("gpt_oss", tmp_path / "src")
    tensors = checkpoint_tensors(src)
    gen = torch.Generator().manual_seed(2)
    refs = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        e, h, two_i = tensors[p + "gate_up_proj"].shape
        del tensors[p + "gate_up_proj"], tensors[p + "down_proj"]
        for which, rows, cols in (("gate_up_proj", two_i, h), ("down_proj", h, two_i // 2)):
            blocks, scales = _random_mxfp4((e, rows), cols, gen)
            tensors[p + which + "_blocks"], tensors[p + which + "_scales"] = blocks, scales
            refs[(layer, which)] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    for f in src.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    cfg["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))

    r = pull_model(str(src), name="oss", dtype=dtype)
    m = r.manifest
    assert m["dequantized"] == (None if dtype is None else "mxfp4") and m["dtype"] == "bfloat16"
    want_format = "mxfp4" if dtype is None else "bf16"
    assert m["formats"]["experts"] == {"gate_proj.weight": want_format, "up_proj.weight": want_format,
                                       "down_proj.weight": want_format, "gate_proj.bias": "bf16",
                                       "up_proj.bias": "bf16", "down_proj.bias": "bf16"}
    stored_cfg = json.loads((r.path / "config.json").read_text())
    assert ("quantization_config" in stored_cfg) == (dtype is None) and stored_cfg["dtype"] == "bfloat16"
    for layer in range(2):
        gu, down = refs[(layer, "gate_up_proj")], refs[(layer, "down_proj")]  # [E, H, 2I], [E, I, H]
        bias = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj_bias"]
        for e in range(8):
            got = _stored(expert_shard_path(r.path, layer, e))
            if dtype is None:
                assert all(isinstance(got[p], QuantTensor) for p in ("gate_proj.weight", "down_proj.weight"))
                got.update({k: v.dequantize(torch.bfloat16) for k, v in got.items() if isinstance(v, QuantTensor)})
            assert torch.equal(got["gate_proj.weight"], gu[e][:, 0::2].T)
            assert torch.equal(got["up_proj.weight"], gu[e][:, 1::2].T)
            assert torch.equal(got["down_proj.weight"], down[e].T)
            assert torch.equal(got["gate_proj.bias"], bias[e][0::2].to(torch.bfloat16))
            assert got["gate_proj.weight"].shape == (64, 64)


def _quantise_fp8(w: torch.Tensor, block: tuple[int, int]):
    n, k = w.shape
    bn, bk = block
    s = torch.empty(-(-n // bn), -(-k // bk))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            s[i, j] = blk.abs().max().clamp(min=1e-8) / 448.0
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_pull_deepseek_v3_fp8_checkpoint_with_scales_in_another_shard(tmp_path, dtype):
    """Weights in shard 1, their scales in shard 2 (so they wait as pending); an MTP layer is dropped.
    FP8 weights are stored as q8_0 by default, as bf16 when --dtype asks."""
    src = make_tiny_checkpoint("deepseek_v3", tmp_path / "src")
    tensors = checkpoint_tensors(src)
    block = (32, 32)
    weights, scales, expected = {}, {}, {}
    for name, t in tensors.items():
        quantise = (t.ndim == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")
                    and ".mlp.gate." not in name)
        if quantise:
            q, s = _quantise_fp8(t, block)
            weights[name], scales[name + "_scale_inv"] = q, s
            expected[name] = _dequantize_fp8_weight(q.clone(), s, list(block), torch.float32).to(torch.bfloat16)
        else:
            weights[name] = t
            expected[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    weights["model.layers.3.embed_tokens.weight"] = torch.zeros(4, 4)  # the MTP layer (index = num layers)
    for f in src.glob("*.safetensors"):
        f.unlink()
    save_file(weights, str(src / "model-00001-of-00002.safetensors"))
    save_file(scales, str(src / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(weights, "model-00001-of-00002.safetensors"),
                                            **dict.fromkeys(scales, "model-00002-of-00002.safetensors")}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                  "activation_scheme": "dynamic"}
    cfg["dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(cfg))

    r = pull_model(str(src), name="v3fp8", dtype=dtype)
    m = r.manifest
    assert m["dequantized"] == ("fp8->q8_0" if dtype is None else "fp8") and m["dtype"] == "bfloat16"
    assert m["dropped_tensors"] == 1
    got = {}
    for f in sorted((r.path / "dense").glob("*.safetensors")):
        got.update(_stored(f))
    for layer in (1, 2):
        for e in range(8):
            shard = _stored(expert_shard_path(r.path, layer, e))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                got[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = shard[f"{proj}.weight"]
    assert sorted(got) == sorted(expected)
    assert (dtype is None) == any(isinstance(t, QuantTensor) for t in got.values())
    for name, want in expected.items():
        if isinstance(got[name], QuantTensor):  # FP8 rows of whole 32-blocks, with no --dtype
            assert dtype is None and got[name].format.name == "q8_0", name
            fp8 = _dequantize_fp8_weight(weights[name].clone(), scales[name + "_scale_inv"], list(block), torch.float32)
            assert torch.equal(got[name].raw, formats.get("q8_0").pack(fp8)), name  # q8_0 of the exact values
            continue
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
