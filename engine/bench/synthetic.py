"""Synthetic models: random weights of a real MoE family's shape, written straight into the store.

``make_synthetic_model(name, family="mixtral", num_layers=..., ...)`` streams random tensors into the
store layout (``dense/part-00001.safetensors``, 4 KiB-aligned ``experts/L<l>/E<e>.safetensors``,
config.json, a byte-level tokenizer, generation_config.json, manifest.json written last) without
building a model in memory: a multi-GB model is written one tensor at a time. The model is built
aside (``models/.partial-<name>``) and renamed into place. Used by ``moeinf bench --synthetic`` and the
offload benchmarks.

A family makes synthetic models when it declares a ``SyntheticRecipe`` (``engine.store.families``):
its config.json keys, its extra per-layer tensors and the shapes of its real checkpoints, which
``SYNTHETIC_SHAPES`` collects; ``synthetic_shape(name, scale)`` shrinks the widths (hidden,
intermediate, heads) by ``scale`` while keeping depth, expert count and top-k.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.store.families import Family, expert_tensor_shapes, families, get_family
from engine.store.paths import expert_shard_path, models_dir
from engine.store.shards import StreamingShardWriter, TensorSpec


@dataclass(frozen=True)
class SyntheticShape:
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int  # per expert
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int = 128


def synthetic_family(name: str) -> Family:
    """The family of ``name`` if it can make synthetic models, else a MoeinfError listing those that can."""
    family = get_family(name)
    if family.synthetic is None:
        able = ", ".join(f.model_type for f in families() if f.synthetic)
        raise MoeinfError(f"synthetic models support the families {able}, not {name!r}")
    return family


SYNTHETIC_SHAPES: dict[str, SyntheticShape] = {
    name: SyntheticShape(f.model_type, *dims)
    for f in families()
    if f.synthetic
    for name, dims in f.synthetic.presets.items()
}


def _round(n: float, mult: int) -> int:
    return max(mult, int(round(n / mult)) * mult)


def synthetic_shape(name: str, scale: float = 1.0) -> SyntheticShape:
    """The shape of ``name`` (a key of SYNTHETIC_SHAPES) with widths multiplied by ``scale``."""
    shape = SYNTHETIC_SHAPES.get(name)
    if shape is None:
        raise MoeinfError(f"unknown synthetic model {name!r}; choose one of: {', '.join(SYNTHETIC_SHAPES)}")
    if not 0 < scale <= 1:
        raise MoeinfError(f"--scale must be in (0, 1], got {scale}")
    if scale == 1:
        return shape
    head_dim = shape.head_dim if shape.hidden * scale >= 4 * shape.head_dim else 64
    hidden = _round(shape.hidden * scale, head_dim)
    heads = hidden // head_dim
    kv = max(1, min(heads, round(shape.kv_heads * scale)))
    while heads % kv:
        kv -= 1
    return replace(
        shape, hidden=hidden, intermediate=_round(shape.intermediate * scale, 64), heads=heads, kv_heads=kv,
        head_dim=head_dim,
    )


def _config(s: SyntheticShape, family: Family, dtype: torch.dtype) -> dict:
    common = {
        "model_type": s.family,
        "hidden_size": s.hidden,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "num_experts_per_tok": s.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_bias": False,
        "synthetic": True,
    }
    return common | family.synthetic.config(s)


def _dense_specs(s: SyntheticShape, family: Family, dtype: torch.dtype) -> list[TensorSpec]:
    H, D = s.hidden, s.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", dtype, (s.vocab, H))]
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        recipe = family.synthetic
        attention = recipe.attention_tensors(s) if recipe.attention_tensors else [
            ("self_attn.q_proj.weight", (s.heads * D, H)),
            ("self_attn.k_proj.weight", (s.kv_heads * D, H)),
            ("self_attn.v_proj.weight", (s.kv_heads * D, H)),
            ("self_attn.o_proj.weight", (H, s.heads * D)),
        ]
        specs += [
            TensorSpec(p + "input_layernorm.weight", dtype, (H,)),
            TensorSpec(p + "post_attention_layernorm.weight", dtype, (H,)),
            *(TensorSpec(p + name, dtype, shape) for name, shape in attention),
            TensorSpec(family.router_weight(i), dtype, (s.num_experts, H)),
        ]
        specs += [TensorSpec(p + name, dtype, shape) for name, shape in family.synthetic.layer_tensors(s)]
    specs += [TensorSpec("model.norm.weight", dtype, (H,)), TensorSpec("lm_head.weight", dtype, (s.vocab, H))]
    return specs


def _random(spec: TensorSpec, gen: torch.Generator, routers: frozenset[str] = frozenset()) -> torch.Tensor:
    if spec.name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(spec.shape, generator=gen)).to(spec.dtype)
    fan_in = spec.shape[-1]
    # routers a little sharper than the projections, so tokens spread over the experts
    std = (2.0 if spec.name in routers else 0.5) / fan_in**0.5
    return torch.randn(spec.shape, generator=gen, dtype=torch.float32).mul_(std).to(spec.dtype)


_BOS, _EOS, _PAD, _IM_START, _IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_tokenizer(out: Path) -> list[Path]:
    """A byte-level BPE tokenizer without merges: 5 special tokens then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", _BOS, _EOS, _PAD, _IM_START, _IM_END]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _PAD,
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": _CHAT_TEMPLATE,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 3}, indent=2)
    )
    return [out / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                              "generation_config.json")]


def _sha_file(path: Path) -> dict:
    import hashlib

    h = hashlib.sha256(path.read_bytes())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def make_synthetic_model(
    name: str,
    family: str = "mixtral",
    num_layers: int = 4,
    num_experts: int = 8,
    top_k: int = 2,
    hidden: int = 256,
    intermediate: int = 512,
    vocab: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    root: Path | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight model of the given shape into the store (``root`` or ``$MOEINF_HOME/models``
    under ``name``); returns its directory. An existing model of that name is kept unless ``overwrite``."""
    fam = synthetic_family(family)
    head_dim = head_dim or (64 if hidden >= 64 else hidden)
    heads = heads or max(1, hidden // head_dim)
    kv_heads = kv_heads or heads
    shape = SyntheticShape(family, num_layers, num_experts, top_k, hidden, intermediate, vocab, heads, kv_heads,
                           head_dim)
    base = Path(root) if root is not None else models_dir()
    final = base / name
    if final.exists() and (final / "manifest.json").exists() and not overwrite:
        return final
    partial = base / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    files: dict[str, dict] = {}

    config = _config(shape, fam, dtype)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    for p in [partial / "config.json", *_write_tokenizer(partial)]:
        files[p.relative_to(partial).as_posix()] = _sha_file(p)

    specs = _dense_specs(shape, fam, dtype)
    routers = frozenset(fam.router_weight(i) for i in range(num_layers))
    dense_path = partial / "dense" / "part-00001.safetensors"
    with StreamingShardWriter(dense_path, specs, align=8) as w:
        for spec in specs:
            w.write(spec.name, _random(spec, gen, routers))
    files["dense/part-00001.safetensors"] = {"size": w.size, "sha256": w.sha256}

    shapes = expert_tensor_shapes(hidden, intermediate)
    espec = [TensorSpec(name, dtype, shapes[name]) for name in fam.expert_tensors]
    expert_size = 0
    for layer in range(num_layers):
        for e in range(num_experts):
            path = expert_shard_path(partial, layer, e)
            with StreamingShardWriter(path, espec) as w:
                for spec in espec:
                    w.write(spec.name, _random(spec, gen))
            expert_size = w.size
            files[path.relative_to(partial).as_posix()] = {"size": w.size, "sha256": w.sha256}

    from engine import __version__

    manifest = {
        "format_version": 1,
        "name": name,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "moeinf_version": __version__,
        "source": {"kind": "synthetic", "shape": asdict(shape), "seed": seed},
        "family": family,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "moe_layers": list(range(num_layers)),
        "hidden_size": hidden,
        "expert_intermediate_size": intermediate,
        "dtype": str(dtype).removeprefix("torch."),
        "source_dtype": str(dtype).removeprefix("torch."),
        "dequantized": None,
        "expert_tensors": [s.name for s in espec],
        "dense_bytes": files["dense/part-00001.safetensors"]["size"],
        "expert_bytes": expert_size,
        "total_bytes": sum(v["size"] for v in files.values()),
        "files": dict(sorted(files.items())),
    }
    tmp = partial / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, partial / "manifest.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


def make_synthetic_from_shape(name: str, shape: SyntheticShape, dtype: torch.dtype = torch.bfloat16,
                              seed: int = 0, root: Path | str | None = None, overwrite: bool = False) -> Path:
    """``make_synthetic_model`` for a ``SyntheticShape`` (e.g. ``synthetic_shape("mixtral-8x7b", 0.25)``)."""
    return make_synthetic_model(
        name, shape.family, shape.num_layers, shape.num_experts, shape.top_k, shape.hidden, shape.intermediate,
        shape.vocab, dtype, seed, heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        root=root, overwrite=overwrite,
    )
