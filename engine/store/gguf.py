"""GGUF file -> Hugging Face-format checkpoint directory (what ``moeinf pull model.gguf`` converts).

``gguf_to_checkpoint(gguf_path, out_dir, dtype, keep_formats)`` reads the file with the ``gguf``
package, undoes llama.cpp's Q/K row permutation for the llama architecture (so the Hugging Face
rotary convention holds), renames the tensors to transformers' names and writes ``config.json``,
``model*.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
``generation_config.json``. Float tensors become ``dtype``. With ``keep_formats`` a quantised tensor
whose GGUF type moeinf stores (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, MXFP4: ``engine.formats``) is copied
block for block (raw U8 blocks, see ``engine.formats.storage``); another GGUF type is converted to the
nearest supported format with one notice per type. Without it every tensor is dequantised by the
``gguf`` package's reference dequantiser to ``dtype``.

Architectures: those a family declares (``Family.gguf``: its GGUF architecture, its config.json
keys, its extra block tensors), with or without routed experts (``ffn_*_exps`` 3-D tensors or
per-expert ``ffn_*.E`` tensors): today ``llama`` dense (-> ``llama``), ``llama`` with experts
(-> ``mixtral``), ``qwen2moe`` (-> ``qwen2_moe``) and ``qwen3moe`` (-> ``qwen3_moe``). Anything else
is refused. The common parts (global and attention tensors, norms, dense MLP, rope, tokenizer) are here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from engine import formats
from engine.errors import MoeinfError
from engine.formats import storage
from engine.formats.tensor import QuantTensor
from engine.store import gguf_tokenizer
from engine.store.dtypes import parse_dtype
from engine.store.families import Family, gguf_family

SHARD_BYTES = 2 << 30  # one safetensors shard per ~2 GiB


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_EXPERT_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # routed experts' projections
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)$")
_EXPS_RE = re.compile(r"^ffn_(gate|up|down)_exps$")


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of a ``GGUFReader`` as plain Python values."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def _open(gguf_path: Path) -> Any:
    from gguf import GGUFReader

    if not gguf_path.is_file():
        raise MoeinfError(f"GGUF file not found: {gguf_path}; check the path")
    try:
        return GGUFReader(str(gguf_path))
    except Exception as exc:  # the gguf package raises ValueError/struct errors on bad files
        raise MoeinfError(f"{gguf_path} is not a readable GGUF file ({exc}); download it again") from None


def _has_experts(tensor_names: set[str]) -> bool:
    return any(".ffn_gate_exps." in n or ".ffn_gate_inp." in n for n in tensor_names)


def _family(meta: dict[str, Any], tensor_names: set[str]) -> Family:
    """The family the file converts to: its architecture's, with or without routed experts."""
    arch = meta.get("general.architecture")
    experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    return gguf_family(arch, experts > 0 or _has_experts(tensor_names))


def _arch_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """``config.json`` for the file's architecture (transformers' names and both RoPE forms)."""
    arch = meta.get("general.architecture")
    family = _family(meta, tensor_names)
    if "rope_freqs.weight" in tensor_names:
        raise MoeinfError(
            "this GGUF uses Llama-3 style rope frequency factors (rope_freqs), which moeinf cannot map back; "
            "pull the model's Hugging Face repository instead"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    vocab = int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens") or [])))
    theta = float(get("rope.freq_base", 10000.0))
    cfg: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise MoeinfError(f"GGUF rope scaling {scaling!r} is not supported; pull the Hugging Face repository")
        factor = float(get("rope.scaling.factor", 1.0))
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        cfg["rope_parameters"] = {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            cfg[name.replace("padding", "pad")] = int(value)

    if family.is_moe and int(get("expert_count", 0) or 0) <= 0:
        raise MoeinfError(f"GGUF has expert tensors but no {arch}.expert_count; the file is incomplete")
    assert family.gguf is not None
    cfg.update(family.gguf.config(get, tensor_names))
    return cfg


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved rotary pairs -> HF's halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _dequantize(data: np.ndarray, tensor_type: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    out = np.ascontiguousarray(dequantize(data, tensor_type), dtype=np.float32)
    return torch.from_numpy(out if out.flags.writeable else out.copy())  # F32 tensors come as read-only views


Loaded = torch.Tensor | QuantTensor  # a float tensor, or a tensor kept in its block format


class _Reader:
    """Turns GGUF tensor data into float tensors or kept-format ``QuantTensor`` objects.

    Float tensors become ``dtype``; with ``keep_formats`` a float GGUF tensor (F32, F16, BF16) keeps
    its own type instead, and a quantised one its blocks (or the nearest supported format)."""

    def __init__(self, dtype: torch.dtype, keep_formats: bool, notice: Callable[[str], None]) -> None:
        self.dtype = dtype
        self.keep_formats = keep_formats
        self.notice = notice
        self.noticed: set[str] = set()

    def load(self, data: np.ndarray, tensor_type: Any) -> Loaded:
        fmt = formats.nearest_for_ggml_type(int(tensor_type))
        if not self.keep_formats:
            return _dequantize(data, tensor_type).to(self.dtype)
        if not fmt.quantised:
            return _dequantize(data, tensor_type).to(fmt.torch_dtype)
        if data.ndim < 2:
            return _dequantize(data, tensor_type)
        if fmt.ggml_type == int(tensor_type):  # the same blocks: copied as they are
            raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())
            return QuantTensor(raw, fmt, fmt.logical_shape(tuple(raw.shape)))
        values = _dequantize(data, tensor_type)
        if values.shape[-1] % fmt.block:
            return values
        name = getattr(tensor_type, "name", str(tensor_type))
        if name not in self.noticed:
            self.noticed.add(name)
            self.notice(f"GGUF type {name} is not stored by moeinf; converting those tensors to {fmt.name}")
        return QuantTensor.quantise(values, fmt)

    def dequantized(self, w: Loaded) -> torch.Tensor:
        """``w`` as a float tensor (routers and other tensors that stay float)."""
        return w.dequantize(self.dtype if not self.keep_formats else torch.float32) if isinstance(w, QuantTensor) else w


def _rows(w: Loaded, fn: Callable[[torch.Tensor], torch.Tensor]) -> Loaded:
    """``fn`` applied to the rows of a float tensor or of a kept tensor's blocks (rows are whole)."""
    if isinstance(w, QuantTensor):
        return QuantTensor(fn(w.raw), w.format, w.shape)
    return fn(w)


def _tensors(reader: Any, cfg: dict[str, Any], family: Family, load: _Reader) -> Iterator[tuple[str, Loaded]]:
    """(checkpoint name, float tensor or QuantTensor) for every tensor of the file, experts split one by one."""
    assert family.gguf is not None
    arch, moe_prefix = family.gguf.architecture, family.moe_module
    hub_proj = {store: hub for hub, store in family.projections.items()}  # gate_proj -> the family's name
    block_names = {**_BLOCK_NAMES, **family.gguf.block_names}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for t in reader.tensors:
        name = t.name
        if name in _GLOBAL_NAMES:
            yield _GLOBAL_NAMES[name], load.load(t.data, t.tensor_type)
            continue
        m = _BLOCK_RE.match(name)
        if m is None:
            raise MoeinfError(f"GGUF tensor {name!r} is not understood for {arch}; pull the Hugging Face repository")
        layer, part, expert, kind = int(m[1]), m[2], m[3], m[4]
        prefix = f"model.layers.{layer}."
        exps = _EXPS_RE.match(part)
        if exps is not None:  # 3-D [E, out, in]: dequantise one expert at a time
            hf = hub_proj[_EXPERT_PROJ[exps[1]]]
            for e in range(t.data.shape[0]):
                yield f"{prefix}{moe_prefix}.experts.{e}.{hf}.{kind}", load.load(t.data[e], t.tensor_type)
            continue
        if expert is not None:  # old per-expert Mixtral tensors: blk.N.ffn_gate.E.weight
            proj = part.removeprefix("ffn_")
            if proj not in _EXPERT_PROJ:
                raise MoeinfError(f"GGUF tensor {name!r} is not understood; pull the Hugging Face repository")
            hf = hub_proj[_EXPERT_PROJ[proj]]
            yield f"{prefix}{moe_prefix}.experts.{expert}.{hf}.{kind}", load.load(t.data, t.tensor_type)
            continue
        w = load.load(t.data, t.tensor_type)
        if part == "ffn_gate_inp":  # routers stay float (llama.cpp never quantises them either)
            w = load.dequantized(w)
            yield f"{prefix}{moe_prefix}.{family.router}.{kind}", w
            continue
        if part not in block_names:
            raise MoeinfError(f"GGUF tensor {name!r} is not understood for {arch}; pull the Hugging Face repository")
        if family.gguf.unpermute_qk and part == "attn_q":
            w = _rows(w, lambda a: _unpermute(a, heads))
        elif family.gguf.unpermute_qk and part == "attn_k":
            w = _rows(w, lambda a: _unpermute(a, kv_heads))
        if part in family.gguf.row_vectors:
            w = load.dequantized(w).reshape(1, -1)
        yield f"{prefix}{block_names[part]}.{kind}", w


class _ShardWriter:
    """Writes tensors into ~SHARD_BYTES safetensors shards plus an index when there is more than one."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_formats: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor | QuantTensor) -> None:
        data, entry = storage.stored_form(tensor)
        self.pending[name] = data.contiguous()
        if entry is not None:
            self.pending_formats[name] = entry
        self.pending_bytes += data.numel() * data.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f"model-part{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt", **storage.metadata(self.pending_formats)})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_formats, self.pending_bytes = {}, {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.written) == 1:
            self.written[0][0].rename(self.out_dir / "model.safetensors")
            return
        total = len(self.written)
        weight_map: dict[str, str] = {}
        size = 0
        for i, (path, names) in enumerate(self.written, start=1):
            final = self.out_dir / f"model-{i:05d}-of-{total:05d}.safetensors"
            path.rename(final)
            size += final.stat().st_size
            weight_map.update(dict.fromkeys(names, final.name))
        _write_json(self.out_dir / "model.safetensors.index.json",
                    {"metadata": {"total_size": size}, "weight_map": weight_map})


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def gguf_to_checkpoint(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    progress: Any = None,
    keep_formats: bool = False,
    notice: Callable[[str], None] | None = None,
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face checkpoint directory at ``out_dir`` and return it.

    The directory is built beside ``out_dir`` and renamed into place when complete. ``progress`` (an
    ``engine.store.pull.PullProgress``) sees one task advanced by the weights of each tensor converted.
    ``keep_formats``: keep quantised tensors in their block formats (see the module docstring);
    ``notice(text)`` hears about each GGUF type converted to another format.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    # kept formats compute in float32 by default, as llama.cpp computes on GGUF weights (and the kept
    # float tensors, norms mostly, are F32): bf16 activations over 4-bit weights can change a small
    # model's greedy answer
    torch_dtype = parse_dtype(dtype) or (torch.float32 if keep_formats else torch.bfloat16)
    reader = _open(gguf_path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = _arch_config(meta, names)
    family = _family(meta, names)
    cfg["dtype"] = str(torch_dtype).removeprefix("torch.")
    cfg["torch_dtype"] = cfg["dtype"]
    cfg["moeinf_source"] = {"format": "gguf", "file": gguf_path.name,
                            "name": meta.get("general.name"), "file_type": meta.get("general.file_type")}
    tokenizer = gguf_tokenizer.build_tokenizer(meta)

    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    writer = _ShardWriter(work)
    total = sum(int(t.n_elements) for t in reader.tensors)
    advance = progress.task(f"reading {gguf_path.name}", total, unit="weights") if progress else (lambda _n: None)
    load = _Reader(torch_dtype, keep_formats, notice or (lambda _text: None))
    for hf_name, loaded in _tensors(reader, cfg, family, load):
        writer.add(hf_name, loaded)
        advance(math.prod(loaded.shape))
    writer.close()

    _write_json(work / "config.json", cfg)
    tokenizer.save(str(work / "tokenizer.json"))
    _write_json(work / "tokenizer_config.json",
                gguf_tokenizer.tokenizer_config(meta, cfg.get("max_position_embeddings")))
    gen: dict[str, Any] = {"eos_token_id": gguf_tokenizer.eos_token_ids(meta)}
    if cfg.get("bos_token_id") is not None:
        gen["bos_token_id"] = cfg["bos_token_id"]
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    _write_json(work / "generation_config.json", gen)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir
