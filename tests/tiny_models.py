"""Tiny random Hugging Face checkpoints of every supported family, for tests (transformers is test-only).

``make_tiny_checkpoint(family, out_dir, layout)`` writes a checkpoint directory exactly as
``save_pretrained`` writes it (config.json, model.safetensors, generation_config.json) plus a real
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja with a
ChatML-style template that supports a system prompt). ``layout="per_expert"`` is the default
``save_pretrained`` layout (one tensor per expert, what hub checkpoints hold); ``layout="fused"`` is
``save_pretrained(save_original_format=False)`` (3-D expert tensors). gpt-oss is always fused.

The weights are random but not degenerate: ``initializer_range`` 0.15, norms, biases, attention sinks
and DeepSeek-V3's ``e_score_correction_bias`` randomised, so greedy decoding is not a run of near-ties
and a wrong norm, bias or routing term changes the tokens.

Each family exercises its own features:
* mixtral: 8 experts, top-2, sliding_window unset, norm always (softmax then renormalise).
* qwen2_moe: shared expert + sigmoid shared gate, ``mlp_only_layers=[1]`` (a dense layer),
  ``decoder_sparse_step=1``, ``norm_topk_prob=False``, qkv bias.
* qwen3_moe: q/k norms, explicit ``head_dim``, ``norm_topk_prob=True``, ``decoder_sparse_step=2``
  with 4 layers (layers 1 and 3 sparse).
* olmoe: q/k norms, ``norm_topk_prob=False``.
* deepseek_v2: MLA without q_lora (``q_lora_rank=None``), yarn rope scaling, ``topk_method=group_limited_greedy``
  with ``n_group``/``topk_group``, ``first_k_dense_replace=1``, shared experts, routed_scaling_factor.
* deepseek_v3: MLA with q_lora, ``first_k_dense_replace=1``, ``n_group``/``topk_group``, sigmoid scores
  with a random non-zero ``e_score_correction_bias``, ``routed_scaling_factor=2.5``, ``norm_topk_prob=True``.
* gpt_oss: sliding + full ``layer_types``, attention sinks, expert and router biases, attention bias;
  intermediate 64 so the experts can be MXFP4-packed (groups of 32).
* llama: dense, no experts (the GGUF demo path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_FAMILIES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "llama",
)
MOE_FAMILIES = tuple(f for f in TINY_FAMILIES if f != "llama")

VOCAB_SIZE = 384  # the tokenizer has at most this many tokens; every model's vocab_size covers it
NUM_EXPERTS = 8
TOP_K = 2
HIDDEN = 64

BOS, EOS, IM_START, IM_END, PAD = "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' and system_message is defined %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Why is the sky blue? Because air scatters blue light
more than red light. The capital of France is Paris. Mixture of experts models route every token
to a few experts out of many, so most weights sit idle on each step. A cache keeps the experts
that matter in fast memory and reads the others from disk when the router asks for them.
Once upon a time there was a little model that could answer questions about the weather, the sea,
numbers like 1 2 3 4 5 6 7 8 9 10, and the names of days: Monday, Tuesday, Wednesday, Thursday.
system user assistant Hello! How can I help you today? Tell me a story about a robot and a cat.
"""


def _common(family: str) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=4,
    )


def tiny_config(family: str):
    """The transformers config of the tiny model of ``family``."""
    import transformers as tf

    c = _common(family)
    if family == "mixtral":
        return tf.MixtralConfig(**c, intermediate_size=96, num_hidden_layers=2,
                                num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**c, intermediate_size=128, num_hidden_layers=3, moe_intermediate_size=48,
                                 shared_expert_intermediate_size=80, num_experts=NUM_EXPERTS,
                                 num_experts_per_tok=TOP_K, norm_topk_prob=False, decoder_sparse_step=1,
                                 mlp_only_layers=[1], qkv_bias=True)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**c, intermediate_size=128, num_hidden_layers=4, moe_intermediate_size=48,
                                 num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
                                 decoder_sparse_step=2, head_dim=24)
    if family == "olmoe":
        return tf.OlmoeConfig(**c, intermediate_size=48, num_hidden_layers=2, num_experts=NUM_EXPERTS,
                              num_experts_per_tok=TOP_K, norm_topk_prob=False)
    if family == "deepseek_v2":
        c["num_key_value_heads"] = 4
        return tf.DeepseekV2Config(
            **c, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3,
            n_routed_experts=NUM_EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=1.5, norm_topk_prob=False,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                             "mscale": 0.707, "mscale_all_dim": 0.707},
        )
    if family == "deepseek_v3":
        c["num_key_value_heads"] = 4
        return tf.DeepseekV3Config(
            **c, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3,
            n_routed_experts=NUM_EXPERTS, n_shared_experts=1, num_experts_per_tok=TOP_K,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    if family == "gpt_oss":
        c["num_key_value_heads"] = 2
        return tf.GptOssConfig(
            **c, intermediate_size=64, num_hidden_layers=2, head_dim=16, num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128},
        )
    if family == "llama":
        return tf.LlamaConfig(**c, intermediate_size=128, num_hidden_layers=2)
    raise ValueError(f"unknown tiny family {family!r}; one of {TINY_FAMILIES}")


def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Make norms, biases, sinks and score-correction biases non-trivial so bugs in them show."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif leaf == "e_score_correction_bias":
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif leaf == "sinks":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif leaf.endswith("bias") and "inv_freq" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def make_tokenizer(out_dir: Path):
    """Train a small byte-level BPE tokenizer and save it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) into ``out_dir``; returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The randomly initialised transformers model of ``family`` (eval mode)."""
    import transformers as tf

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype).eval()


def make_tiny_checkpoint(
    family: str,
    out_dir: str | Path,
    layout: str = "per_expert",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``out_dir``; returns ``out_dir``.

    ``layout``: "per_expert" (default ``save_pretrained``, one tensor per expert) or "fused"
    (``save_original_format=False``, 3-D expert tensors). ``max_shard_size`` (e.g. "100KB") splits the
    weights into several ``model-0000k-of-0000n.safetensors`` with an index, as hub checkpoints are.
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', not {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(family, seed=seed, dtype=dtype)
    model.generation_config.eos_token_id = [1, 3]  # </s> and <|im_end|>
    model.generation_config.bos_token_id = 0
    model.generation_config.pad_token_id = 4
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), save_original_format=(layout == "per_expert"), **kwargs)
    make_tokenizer(out)
    return out


def load_reference(ckpt_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model of a checkpoint dir, in eval mode (the fidelity reference)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=dtype).eval()


def checkpoint_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a checkpoint dir, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def read_config(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / "config.json").read_text())
