"""GGUF -> Hugging Face checkpoint: tensors, logits and tokenizer against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_testlib import TEXTS, write_gguf
from safetensors.torch import load_file
from tiny_models import make_tiny_model, make_tokenizer

from engine.errors import MoeinfError
from engine.store.gguf import gguf_to_checkpoint


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _make(tmp_path: Path, family: str, quantize: tuple[str, ...] = (),
          per_expert: bool = False) -> tuple[torch.nn.Module, Path]:
    model = make_tiny_model(family)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir(exist_ok=True)
    make_tokenizer(tok_dir)
    return model, write_gguf(model, family, tok_dir, tmp_path / f"{family}.gguf", quantize=quantize,
                             per_expert=per_expert)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_tiny_gguf_round_trip_matches_transformers(tmp_path, family):
    """A tiny model written as GGUF and converted back gives the original's tensors and logits."""
    from transformers import AutoModelForCausalLM

    model, path = _make(tmp_path, family)
    ckpt = gguf_to_checkpoint(path, tmp_path / "ckpt", "float32")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == family
    converted = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ref, got = model.state_dict(), converted.state_dict()
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)
    ids = torch.randint(5, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_expert", [False, True])
def test_mixtral_gguf_writes_per_expert_hub_names(tmp_path, per_expert):
    """Routed experts (3-D ffn_*_exps, or the older one tensor per expert) come out one tensor per
    expert (w1=gate, w3=up, w2=down) as hub Mixtral has them."""
    model, path = _make(tmp_path, "mixtral", per_expert=per_expert)
    tensors = _tensors(gguf_to_checkpoint(path, tmp_path / "ckpt", "float32"))
    gate_up = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    torch.testing.assert_close(tensors["model.layers.1.block_sparse_moe.experts.5.w1.weight"], gate_up[5, :inter])
    torch.testing.assert_close(tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"], gate_up[5, inter:])
    torch.testing.assert_close(tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"],
                               model.state_dict()["model.layers.1.mlp.experts.down_proj"][5])
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_pulled_gguf_runs_in_the_engine_like_transformers(tmp_path, family):
    """`moeinf pull model.gguf` (pull_model) then the engine: logits equal transformers' on the original."""
    import engine
    from engine.store.pull import pull_model

    model, path = _make(tmp_path, family)
    pull_model(str(path), name=f"tiny-{family}-gguf", dtype="fp32")
    session = engine.load(f"tiny-{family}-gguf", ctx=64)
    ids = torch.randint(5, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(session.logits(ids.tolist()), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_qwen2_moe_dense_layer_is_listed(tmp_path):
    """A qwen2moe layer stored with a plain FFN becomes mlp_only_layers in config.json."""
    _, path = _make(tmp_path, "qwen2_moe")
    cfg = json.loads((gguf_to_checkpoint(path, tmp_path / "ckpt", "float32") / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1] and cfg["num_experts"] == 8 and cfg["moe_intermediate_size"] == 48


def test_llama_gguf_matches_transformers_own_gguf_loader(tmp_path):
    """transformers' GGUF loader reads the same file into the same tensors (Q/K permutation included)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, path = _make(tmp_path, "llama")
    ckpt = gguf_to_checkpoint(path, tmp_path / "ckpt", "float32")
    ours = _tensors(ckpt)
    shell = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(ckpt)))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=shell)["tensors"]
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=0, atol=0, msg=name)


def test_quantised_tensors_are_dequantised(tmp_path):
    """Q8_0 tensors come back as llama.cpp's own dequantisation, cast to the chosen dtype."""
    model, path = _make(tmp_path, "llama", quantize=("ffn_", "attn_v", "token_embd"))
    reader = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    ckpt = gguf_to_checkpoint(path, tmp_path / "ckpt", "bfloat16")
    tensors = _tensors(ckpt)
    up = tensors["model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == torch.bfloat16
    ref = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    expect = gguf.quants.dequantize(gguf.quants.quantize(ref, gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0)
    torch.testing.assert_close(up, torch.from_numpy(np.asarray(expect)).to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(up.float(), torch.from_numpy(ref))  # it really was quantised
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"


def test_quantised_3d_expert_tensors_are_dequantised_per_expert(tmp_path):
    model, path = _make(tmp_path, "mixtral", quantize=("ffn_",))
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    tensors = _tensors(gguf_to_checkpoint(path, tmp_path / "ckpt", "float32"))
    q8 = gguf.GGMLQuantizationType.Q8_0
    for e in (0, 3, 7):
        ref = model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"][e, :96].numpy()
        expect = torch.from_numpy(np.asarray(gguf.quants.dequantize(gguf.quants.quantize(ref, q8), q8)))
        torch.testing.assert_close(tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"], expect,
                                   rtol=0, atol=0)


def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path):
    """tokenizer.json built from GGUF metadata encodes like transformers' GGUF tokenizer loading."""
    from transformers import AutoTokenizer

    _, path = _make(tmp_path, "llama")
    ckpt = gguf_to_checkpoint(path, tmp_path / "ckpt", "float32")
    ours = AutoTokenizer.from_pretrained(str(ckpt))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"] == original(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == "<s>" + text  # BOS added, as the GGUF says
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and "im_start" in cfg["chat_template"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1] and gen["bos_token_id"] == 0


def test_sentencepiece_tokenizer_matches_transformers_gguf_tokenizer(tmp_path):
    """A Llama-2/Mixtral-style SentencePiece vocabulary (scores, byte fallback, no merges) encodes and
    decodes like transformers' GGUF tokenizer."""
    from transformers import AutoTokenizer

    model = make_tiny_model("mixtral")
    path = write_gguf(model, "mixtral", None, tmp_path / "spm.gguf")
    ckpt = gguf_to_checkpoint(path, tmp_path / "ckpt", "float32")
    ours = AutoTokenizer.from_pretrained(str(ckpt))
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [t for t in TEXTS if "<|im_start|>" not in t] + ["<s>hello</s> world", "über naïve café — ok?"]
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1  # BOS
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    assert any(tok.startswith("<0x") for tok in ours.convert_ids_to_tokens(ours("日本 🎉")["input_ids"]))


def test_unsupported_architecture_is_a_one_line_error(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MoeinfError, match="architecture 'gpt2' is not supported") as err:
        gguf_to_checkpoint(path, tmp_path / "ckpt", "float32")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_missing_or_corrupt_file_is_a_user_error(tmp_path):
    with pytest.raises(MoeinfError, match="not found"):
        gguf_to_checkpoint(tmp_path / "nope.gguf", tmp_path / "ckpt", "float32")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(MoeinfError, match="not a readable GGUF"):
        gguf_to_checkpoint(bad, tmp_path / "ckpt", "float32")
