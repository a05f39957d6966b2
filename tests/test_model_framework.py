"""The model framework's contracts: the ExpertSource protocol as the MoE block uses it, forward hooks
on ``layers[i].mlp``, ``last_only``, config parsing, the family registry and the loader's errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence

import pytest
import torch
from model_fidelity import pull_tiny
from safetensors.torch import load_file, save_file

from engine.errors import MoeinfError
from engine.model.args import ModelArgs
from engine.model.experts import ExpertWeights, MappedExperts
from engine.model.layers.moe import MoEBlock
from engine.model.loader import load_model
from engine.store.families import get_family, supported_model_types

TOKENS = torch.tensor([0, 9, 33, 120, 7, 250, 3, 18, 64, 301, 2, 77])


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """qwen2_moe: sparse layers 0 and 2, a dense MLP at layer 1, shared experts."""
    root = tmp_path_factory.mktemp("framework")
    _, store = pull_tiny("qwen2_moe", root)
    return store


class RecordingExperts:
    """An ExpertSource that records calls, yields experts in reverse order and destroys what it
    yielded at the next fetch (so a block that kept weights beyond its loop would go wrong)."""

    def __init__(self, inner: MappedExperts):
        self.inner = inner
        self.calls: list[tuple] = []
        self._live: list[ExpertWeights] = []

    def observe(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        self.calls.append(("observe", layer, topk_ids.clone(), tuple(hidden.shape)))

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        for w in self._live:
            for t in (w.gate, w.up, w.down):
                t.fill_(float("nan"))
        self._live = []
        self.calls.append(("fetch", layer, list(expert_ids)))
        for e, w in reversed(list(self.inner.fetch(layer, expert_ids))):
            copy = ExpertWeights(w.gate.clone(), w.up.clone(), w.down.clone())
            self._live.append(copy)
            yield e, copy


def test_moe_block_reaches_experts_only_through_observe_then_fetch(qwen2):
    reference = load_model(qwen2, max_seq_len=32)
    expected_prefill = reference(TOKENS, 0)
    expected_decode = reference(torch.tensor([5]), len(TOKENS))
    source = RecordingExperts(MappedExperts(qwen2, torch.float32))
    model = load_model(qwen2, experts=source, max_seq_len=32)
    got_prefill = model(TOKENS, 0)
    assert (got_prefill - expected_prefill).abs().max().item() < 1e-5
    moe_layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)]
    assert moe_layers == [0, 2]
    assert [c[:2] for c in source.calls] == [("observe", 0), ("fetch", 0), ("observe", 2), ("fetch", 2)]
    for obs, fetch in zip(source.calls[::2], source.calls[1::2], strict=True):
        _, _, ids, hidden_shape = obs
        assert ids.shape == (len(TOKENS), 2) and ids.dtype == torch.int64
        assert hidden_shape == (len(TOKENS), 64)
        assert fetch[2] == sorted(set(ids.flatten().tolist()))  # each needed expert once
    source.calls.clear()
    got_decode = model(torch.tensor([5]), len(TOKENS))
    assert (got_decode - expected_decode).abs().max().item() < 1e-5
    fetched = [c for c in source.calls if c[0] == "fetch"]
    assert all(len(c[2]) == 2 and len(set(c[2])) == 2 for c in fetched)


def test_forward_hooks_on_mlp_and_last_only(qwen2):
    model = load_model(qwen2, max_seq_len=32)
    seen = []
    handle = model.layers[2].mlp.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    full = model(TOKENS, 0)
    handle.remove()
    assert seen == [torch.Size([len(TOKENS), 64])]
    last = model(TOKENS, 0, last_only=True)
    assert last.shape == (1, model.vocab_size)
    torch.testing.assert_close(last[0], full[-1], rtol=0, atol=1e-5)


def test_context_overflow_is_a_one_line_error(qwen2):
    model = load_model(qwen2, max_seq_len=16)
    assert model.max_seq_len == 16
    model(TOKENS, 0)
    with pytest.raises(MoeinfError, match="17 tokens do not fit the context of 16"):
        model(torch.tensor([1, 2, 3, 4, 5]), 12)


def test_loader_errors(qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen2, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(MoeinfError, match="unsupported model family 'bert'; moeinf supports .*mixtral"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps(config))
    dense = sorted((broken / "dense").glob("*.safetensors"))
    tensors = load_file(str(dense[0]))
    name = next(k for k in tensors if k.endswith("shared_expert_gate.weight"))
    tensors[name] = torch.zeros(1, 3)
    save_file(tensors, str(dense[0]))
    with pytest.raises(MoeinfError, match=r"has shape \(1, 3\), its config implies \(1, 64\)"):
        load_model(broken)
    del tensors[name]
    save_file(tensors, str(dense[0]))
    with pytest.raises(MoeinfError, match="missing"):
        load_model(broken)
    (broken / "config.json").unlink()
    with pytest.raises(MoeinfError, match="config.json is missing"):
        load_model(broken)


def test_model_args_from_config_both_styles():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    a = ModelArgs.from_config({**base, "torch_dtype": "bfloat16", "rope_theta": 500.0})
    assert a.dtype == torch.bfloat16 and a.rope == {"rope_type": "default", "rope_theta": 500.0}
    assert a.num_kv_heads == 2 and a.head_dim == 4
    b = ModelArgs.from_config({**base, "dtype": "float32", "head_dim": 16, "num_key_value_heads": 1,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert b.dtype == torch.float32 and b.rope["rope_theta"] == 7.0 and b.head_dim == 16
    c = ModelArgs.from_config(base, defaults={"rms_norm_eps": 1e-5})
    assert c.rms_norm_eps == 1e-5 and c.rope["rope_theta"] == 10000.0
    with pytest.raises(MoeinfError, match="lacks 'vocab_size'"):
        ModelArgs.from_config({k: v for k, v in base.items() if k != "vocab_size"})


def test_registry_knows_the_families():
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama"} <= set(supported_model_types())
    assert get_family("mixtral").model_type == "mixtral"
