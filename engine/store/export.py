"""Store model -> a standard Hugging Face checkpoint directory (the hand-off to vLLM, SGLang, transformers).

``export_model(name_or_path, out_dir)`` rebuilds what the hub holds, from the store alone (nothing is
downloaded): ``config.json`` (as stored: a dequantised source no longer names a quantisation),
``generation_config.json``, the tokenizer files and chat template, and the weights under the hub's
tensor names in ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``.
Names per family (the inverse of the pull's):

* mixtral: ``model.layers.L.block_sparse_moe.gate.weight`` and
  ``block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (gate, up, down);
* gpt_oss: the fused ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate and up interleaved),
  ``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H], ``down_proj_bias`` [E, H];
* the others: ``model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight``.

Tensors are read one at a time (a gpt-oss layer's experts together) and written in the stored dtype.
The directory is built aside (``<out_dir>.partial``) and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import MoeinfError
from engine.store.convert import SpillingShardWriter
from engine.store.families import moe_layout
from engine.store.manifest import read_manifest, resolve_model
from engine.store.paths import expert_shard_path

SHARD_BYTES = 4 << 30  # a new weights file after this many bytes (the hub's usual 4-5 GB)
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _dense(root: Path, family: str) -> Iterator[tuple[str, torch.Tensor]]:
    for part in sorted((root / "dense").glob("*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                out = name.replace(".mlp.", ".block_sparse_moe.") if family == "mixtral" else name
                yield out, f.get_tensor(name)


def _expert(root: Path, layer: int, expert: int) -> dict[str, torch.Tensor]:
    path = expert_shard_path(root, layer, expert)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (OSError, ValueError) as err:
        raise MoeinfError(
            f"{path} is unreadable ({err}); run `moeinf verify` and pull the model again"
        ) from None
    odd = sorted(n for n, t in tensors.items() if t.dtype not in _FLOAT)
    if odd:
        raise MoeinfError(
            f"{path} holds quantised tensors ({', '.join(odd)}); export writes float checkpoints only"
        )
    return tensors


def _experts(root: Path, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    layout = moe_layout(config)
    for layer in layout.moe_layers:
        prefix = f"model.layers.{layer}"
        if layout.family == "gpt_oss":
            yield from _gpt_oss_layer(root, prefix, layer, layout.num_experts)
            continue
        for e in range(layout.num_experts):
            t = _expert(root, layer, e)
            if layout.family == "mixtral":
                base = f"{prefix}.block_sparse_moe.experts.{e}"
                names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
            else:
                base = f"{prefix}.mlp.experts.{e}"
                names = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
            for proj, hub in names.items():
                yield f"{base}.{hub}.weight", t[f"{proj}.weight"]


def _gpt_oss_layer(root: Path, prefix: str, layer: int, n: int) -> Iterator[tuple[str, torch.Tensor]]:
    experts = [_expert(root, layer, e) for e in range(n)]
    gate = torch.stack([x["gate_proj.weight"].t() for x in experts])  # [E, H, I]
    up = torch.stack([x["up_proj.weight"].t() for x in experts])
    gate_up = torch.stack((gate, up), dim=-1).flatten(-2)  # [E, H, 2I]: gate at 0::2, up at 1::2
    bias = torch.stack(
        (
            torch.stack([x["gate_proj.bias"] for x in experts]),
            torch.stack([x["up_proj.bias"] for x in experts]),
        ),
        dim=-1,
    ).flatten(-2)
    yield f"{prefix}.mlp.experts.gate_up_proj", gate_up.contiguous()
    yield f"{prefix}.mlp.experts.gate_up_proj_bias", bias.contiguous()
    yield (
        f"{prefix}.mlp.experts.down_proj",
        torch.stack([x["down_proj.weight"].t() for x in experts]).contiguous(),
    )
    yield f"{prefix}.mlp.experts.down_proj_bias", torch.stack([x["down_proj.bias"] for x in experts])


def _write_weights(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out: Path,
    shard_bytes: int,
    on_tensor: Callable[[str], None] | None,
) -> dict[str, str]:
    """Shards ``model-part-k`` in ``out``, renamed to the hub's names at the end; the weight map."""
    parts: list[tuple[Path, list[str], int]] = []
    writer, names, size = None, [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if writer is not None and size + nbytes > shard_bytes:
            writer.finish()
            parts.append((writer.path, names, size))
            writer = None
        if writer is None:
            writer, names, size = SpillingShardWriter(out / f"part-{len(parts)}.safetensors"), [], 0
        writer.add(name, t)
        names.append(name)
        size += nbytes
        if on_tensor is not None:
            on_tensor(name)
    if writer is not None:
        writer.finish()
        parts.append((writer.path, names, size))
    weight_map: dict[str, str] = {}
    total = len(parts)
    for k, (path, part_names, _) in enumerate(parts):
        final = "model.safetensors" if total == 1 else f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(part_names, final))
    return weight_map


def export_model(
    name_or_path: str | Path,
    out_dir: str | Path,
    shard_bytes: int = SHARD_BYTES,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write the store model as a Hugging Face checkpoint directory ``out_dir``; returns it."""
    root = resolve_model(name_or_path)
    read_manifest(root)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeinfError(f"{out} exists and is not empty; give a new directory")
    config = json.loads((root / "config.json").read_text())
    family = moe_layout(config).family
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in COPIED:
            if (root / name).is_file():
                shutil.copyfile(root / name, partial / name)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            yield from _dense(root, family)
            yield from _experts(root, config)

        weight_map = _write_weights(weights(), partial, shard_bytes, on_tensor)
        if len(set(weight_map.values())) > 1:
            total = sum((partial / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise MoeinfError(
            f"writing {out} failed ({err.strerror or err}); free some disk space and retry"
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out
