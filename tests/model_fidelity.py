"""Helpers for the model fidelity tests: tiny checkpoints into a store directory, and the
transformers reference on the same weights.

``store_from_checkpoint`` uses the store converter (``engine.store.convert``) when it exists;
until then it writes the store layout itself from the transformers model's in-memory tensors
(dense tensors by name, routed experts split from the fused 3-D parameters into per-expert shards
with the canonical names of ``engine.model.experts``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.store.paths import expert_shard_path


def write_store_from_model(hf_model, ckpt_dir: Path, store_dir: Path) -> Path:
    """Store layout (config.json, dense/model.safetensors, experts/L*/E*.safetensors) of a
    transformers model whose routed experts are fused ``mlp.experts.gate_up_proj`` [E, 2I, H] and
    ``mlp.experts.down_proj`` [E, H, I] parameters."""
    store_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (ckpt_dir / name).exists():
            shutil.copy(ckpt_dir / name, store_dir / name)
    dense: dict[str, torch.Tensor] = {}
    for name, t in hf_model.state_dict().items():
        if ".mlp.experts." not in name:
            if name == "lm_head.weight" and hf_model.config.tie_word_embeddings:
                continue
            dense[name] = t.detach().clone().contiguous()
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                _add_expert(store_dir, layer, e, {
                    "gate_proj.weight": t[e, :inter], "up_proj.weight": t[e, inter:]})
        elif leaf == "down_proj":
            for e in range(t.shape[0]):
                _add_expert(store_dir, layer, e, {"down_proj.weight": t[e]})
        else:
            raise ValueError(f"unexpected expert tensor {name}")
    (store_dir / "dense").mkdir(exist_ok=True)
    save_file(dense, str(store_dir / "dense" / "model.safetensors"))
    _flush_experts(store_dir)
    (store_dir / "manifest.json").write_text(json.dumps({"format": 1, "source": str(ckpt_dir)}))
    return store_dir


_PENDING: dict[tuple[Path, int, int], dict[str, torch.Tensor]] = {}


def _add_expert(store_dir: Path, layer: int, e: int, tensors: dict[str, torch.Tensor]) -> None:
    _PENDING.setdefault((store_dir, layer, e), {}).update(
        {k: v.detach().clone().contiguous() for k, v in tensors.items()})


def _flush_experts(store_dir: Path) -> None:
    for key in [k for k in _PENDING if k[0] == store_dir]:
        _, layer, e = key
        path = expert_shard_path(store_dir, layer, e)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_PENDING.pop(key), str(path))
