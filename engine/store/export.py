"""Store model -> a standard Hugging Face checkpoint directory (the hand-off to vLLM, SGLang, transformers).

``export_model(name_or_path, out_dir)`` rebuilds what the hub holds, from the store alone (nothing is
downloaded): ``config.json`` (as stored: a dequantised source no longer names a quantisation),
``generation_config.json``, the tokenizer files and chat template, and the weights under the hub's
tensor names in ``model-0000k-of-0000n.safetensors`` shards with ``model.safetensors.index.json``.
The names are the family's (``engine.store.families.Family``, the inverse of the pull's): the MoE
block's module (``moe_module``, e.g. Mixtral's ``block_sparse_moe``), the experts one per expert with
the hub's projection names (``projections``, e.g. Mixtral's ``w1``/``w3``/``w2``), or fused per layer
where the family's hub checkpoints are (``fuse_experts``, gpt-oss).

Tensors are read one at a time (a gpt-oss layer's experts together) and written in the stored dtype.
The directory is built aside (``<out_dir>.partial``) and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import MoeinfError
from engine.store.convert import SpillingShardWriter
from engine.store.families import Family, family_of
from engine.store.opened import StoreModel, open_model

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
_LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.")


def _dense(root: Path, family: Family, moe_layers: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense tensors under the hub's names (the MoE block renamed back where the family's is not ``mlp``)."""
    for part in sorted((root / "dense").glob("*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                m = _LAYER_MLP.match(name)
                out = name
                if m and int(m.group(1)) in moe_layers and family.moe_module != "mlp":
                    out = f"model.layers.{m.group(1)}.{family.moe_module}.{name[m.end() :]}"
                yield out, f.get_tensor(name)


def _expert(store: StoreModel, layer: int, expert: int) -> dict[str, torch.Tensor]:
    path = store.expert_path(layer, expert)
    tensors = store.read_expert(layer, expert)  # a damaged shard: one line naming it
    odd = sorted(n for n, t in tensors.items() if t.dtype not in _FLOAT)
    if odd:
        raise MoeinfError(
            f"{path} holds quantised tensors ({', '.join(odd)}); export writes float checkpoints only"
        )
    return tensors


def _experts(store: StoreModel, family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """The routed experts under the hub's names: one tensor per expert and projection, or the family's
    fused tensors per layer."""
    layout = store.layout
    hub_names = {store: hub for hub, store in family.projections.items()}  # gate_proj -> w1 (Mixtral)
    for layer in layout.moe_layers:
        prefix = f"model.layers.{layer}.{family.moe_module}.experts"
        if family.fuse_experts is not None:
            shards = [_expert(store, layer, e) for e in range(layout.num_experts)]
            for name, t in family.fuse_experts(shards).items():
                yield f"{prefix}.{name}", t
            continue
        for e in range(layout.num_experts):
            for name, t in _expert(store, layer, e).items():
                proj, _, kind = name.partition(".")
                yield f"{prefix}.{e}.{hub_names.get(proj, proj)}.{kind}", t


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
    store = open_model(name_or_path)
    root, config = store.root, store.config
    moe_layers = set(store.layout.moe_layers)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeinfError(f"{out} exists and is not empty; give a new directory")
    family = family_of(config)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in COPIED:
            if (root / name).is_file():
                shutil.copyfile(root / name, partial / name)

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            yield from _dense(root, family, moe_layers)
            yield from _experts(store, family)

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
