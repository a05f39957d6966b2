"""A GGUF whose MoE layers keep their experts in different formats, as llama.cpp's Q4_K_M does.

``llama-quantize ... Q4_K_M`` stores ``ffn_down_exps`` in Q6_K in some layers and Q4_K in the others
(and ``attn_output`` in Q5_K): the experts of one layer share a format, the layers do not. The pull
keeps each layer's blocks; the model runs resident and offloaded (slots sized for the largest
layer's experts) with the tokens of the all-resident run, and its logits match transformers on the
same file dequantised by the gguf package within the float fidelity bound.
"""

from __future__ import annotations

import torch
import transformers as tf
from gguf_testlib import write_gguf
from memory_models import greedy
from test_formats_fidelity import LOGIT_BOUND, _model
from tiny_models import make_tokenizer

from engine.memory import open_experts
from engine.memory.offload import OffloadedExperts
from engine.model.experts import load_expert
from engine.model.loader import load_model
from engine.store.gguf import gguf_to_checkpoint
from engine.store.opened import as_store_model
from engine.store.pull import pull_model

PROMPT = [0, 5, 17, 99, 3, 42, 7]
STEPS = 12


def test_layers_with_different_expert_formats_pull_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    model = _model(96, 160, seed=3)  # 2 layers
    make_tokenizer(tmp_path / "tok")
    path = write_gguf(model, "mixtral", tmp_path / "tok", tmp_path / "m.gguf", quantize=("ffn_", "attn_"),
                      qtype="Q4_0", qtypes={"blk.1.ffn_down": "Q8_0"})
    pulled = pull_model(str(path), name="mixed")
    store = as_store_model(pulled.path)
    assert store.layer_expert_tensors(0)["down_proj.weight"].format == "q4_0"
    assert store.layer_expert_tensors(1)["down_proj.weight"].format == "q8_0"
    assert store.layer_expert_tensors(1)["gate_proj.weight"].format == "q4_0"
    w1, _ = load_expert(store, 1, 3, torch.float32, torch.device("cpu"))
    assert w1.down.format.name == "q8_0" and w1.gate.format.name == "q4_0"

    ckpt = gguf_to_checkpoint(path, tmp_path / "ref", "float32")  # the gguf package's dequantisation
    ref = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = load_model(pulled.path, dtype=torch.float32, max_seq_len=64, activations="float32")
    seq = torch.tensor([PROMPT + list(range(20, 30))])
    with torch.no_grad():
        diff = (ours(seq[0], 0) - ref(seq).logits[0]).abs().max().item()
    assert diff < LOGIT_BOUND, diff
    resident = greedy(ours, PROMPT, STEPS)

    probe = open_experts(pulled.path, torch.float32, "cpu", "99%", "lru", prefetch=False)
    try:  # slots fit the layer with the larger experts (q8_0 down rows)
        slot = probe.transfer.slot_bytes
        assert slot >= max(as_store_model(pulled.path).expert_path(layer, 0).stat().st_size for layer in (0, 1))
        top_k = probe.top_k
    finally:
        probe.close()
    for policy, budget in (("lru", top_k * slot), ("eam", 5 * slot)):
        src = open_experts(pulled.path, torch.float32, "cpu", str(budget), policy)
        assert isinstance(src, OffloadedExperts)
        try:
            model = load_model(pulled.path, dtype=torch.float32, experts=src, max_seq_len=64, activations="float32")
            tokens = greedy(model, PROMPT, STEPS)
            assert src.stats().demand_loads > 0
        finally:
            src.close()
        assert tokens == resident, policy


def test_q4_k_m_mix_keeps_q5_k_attn_output_and_matches_transformers(tmp_path, monkeypatch):
    """llama.cpp's Q4_K_M mix (Q4_K, one layer's ``ffn_down`` in Q6_K, ``attn_output`` in Q5_K): every
    tensor's blocks are kept (no conversion, no notice), so the logits equal transformers' on the
    gguf-dequantised file up to the order of the float32 sums."""
    from test_formats_fidelity import _bound

    from engine.store.pull import PullProgress

    class Messages(PullProgress):
        def __init__(self):
            self.messages = []

        def message(self, text):
            self.messages.append(text)

    monkeypatch.setenv("MOEINF_HOME", str(tmp_path / "home"))
    model = _model(256, 256, seed=11)
    make_tokenizer(tmp_path / "tok")
    path = write_gguf(model, "mixtral", tmp_path / "tok", tmp_path / "m.gguf", quantize=("ffn_", "attn_"),
                      qtype="Q4_K", qtypes={"attn_output": "Q5_K", "blk.1.ffn_down": "Q6_K"})
    progress = Messages()
    pulled = pull_model(str(path), name="q4km", progress=progress)
    assert not any("not stored" in text for text in progress.messages), progress.messages
    dense = pulled.manifest["formats"]["dense"]
    assert dense["model.layers.0.self_attn.o_proj.weight"] == "q5_k"
    assert dense["model.layers.1.self_attn.o_proj.weight"] == "q5_k"
    assert dense["model.layers.0.self_attn.q_proj.weight"] == "q4_k"
    store = as_store_model(pulled.path)
    assert store.layer_expert_tensors(1)["down_proj.weight"].format == "q6_k"

    ckpt = gguf_to_checkpoint(path, tmp_path / "ref", "float32")
    ref = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = load_model(pulled.path, dtype=torch.float32, max_seq_len=64, activations="float32")  # the float32 contract
    assert ours.layers[0].self_attn.o_proj.weight.format.name == "q5_k"
    seq = torch.tensor([PROMPT + list(range(20, 30))])
    with torch.no_grad():
        ref_logits = ref(seq).logits[0]
        diff = (ours(seq[0], 0) - ref_logits).abs().max().item()
    assert diff < _bound(ref_logits, 256), diff
