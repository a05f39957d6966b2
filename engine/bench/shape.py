"""What ``moeinf predict`` knows of a model before any weight is read: its config and tensor headers.

A model is a store model (its name or directory), a local checkpoint directory, a GGUF file, an alias
or a hub repo. For a hub repo only ``config.json``, ``model.safetensors.index.json`` and each shard's
safetensors header are fetched, the header by two ranged reads (8 bytes, then the header's length),
never a byte of tensor data; a GGUF's header is read by ``gguf`` the same way (memory-mapped, the
tensor data untouched).

The split between dense weights and routed experts comes from the family's layout
(``engine.store.families.moe_layout``: MoE layers, experts per layer, their shape) and the header's
sizes: an expert's bytes per weight are those of the header's expert tensors (so a quantised
checkpoint counts as stored), everything else is dense.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import MoeinfError
from engine.store.families import moe_layout
from engine.store.header import SafetensorsHeader, parse_header, read_header

Tensors = dict[str, tuple[int, int]]  # name -> (bytes, elements)

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
}


@dataclass
class ModelShape:
    name: str
    source: str  # "store" | "local" | "gguf" | "hub"
    config: dict
    family: str
    num_layers: int
    moe_layers: int
    num_experts: int
    top_k: int
    hidden: int
    expert_params: int  # weights of one routed expert
    expert_bytes: int  # bytes of one routed expert as stored
    dense_bytes: int
    dense_params: int
    store_name: str | None = None  # a store model: its traces may drive the routing model

    @property
    def experts_total(self) -> int:
        return self.moe_layers * self.num_experts

    @property
    def expert_bytes_total(self) -> int:
        return self.experts_total * self.expert_bytes

    @property
    def active_params(self) -> int:
        """Weights one token multiplies by: the dense part and top_k experts per MoE layer."""
        return self.dense_params + self.moe_layers * self.top_k * self.expert_params

    def with_expert_format(self, bits_per_weight: float) -> ModelShape:
        from dataclasses import replace

        return replace(self, expert_bytes=int(self.expert_params * bits_per_weight / 8))


def kv_bytes_per_token(config: dict, elem: int = 2) -> int:
    import torch

    from engine.memory.open import kv_bytes

    return kv_bytes(config, 1, {2: torch.bfloat16, 4: torch.float32}.get(elem, torch.bfloat16))


def _is_expert_tensor(name: str) -> bool:
    low = name.lower()
    return ("experts." in low or "_exps" in low) and "shared" not in low


def shape_from(
    name: str,
    source: str,
    config: dict,
    tensors: Tensors,
    expert_bytes: int | None = None,
    dense_bytes: int | None = None,
    store_name: str | None = None,
) -> ModelShape:
    """Split ``tensors`` (or the store's measured ``expert_bytes``/``dense_bytes``) by the family's layout."""
    layout = moe_layout(config)
    if not layout.is_moe:
        raise MoeinfError(f"{name} is a dense model (no routed experts); moeinf predict forecasts MoE models")
    expert_params = 3 * layout.hidden_size * layout.expert_intermediate_size
    n_experts = len(layout.moe_layers) * layout.num_experts
    total_b = sum(b for b, _ in tensors.values())
    total_n = sum(n for _, n in tensors.values())
    ex_b = sum(b for k, (b, _) in tensors.items() if _is_expert_tensor(k))
    ex_n = sum(n for k, (_, n) in tensors.items() if _is_expert_tensor(k))
    per_weight = ex_b / ex_n if ex_n else (total_b / total_n if total_n else 2.0)
    if expert_bytes is None:
        expert_bytes = int(expert_params * per_weight)
    dense_params = max(0, total_n - n_experts * expert_params) if total_n else 0
    if dense_bytes is None:
        dense_bytes = max(0, total_b - n_experts * expert_bytes)
    elif not dense_params:
        dense_params = dense_bytes // 2
    return ModelShape(
        name=name,
        source=source,
        config=config,
        family=layout.family,
        num_layers=layout.num_layers,
        moe_layers=len(layout.moe_layers),
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        hidden=layout.hidden_size,
        expert_params=expert_params,
        expert_bytes=expert_bytes,
        dense_bytes=dense_bytes,
        dense_params=dense_params,
        store_name=store_name,
    )


def _header_tensors(header: SafetensorsHeader) -> Tensors:
    """name -> (bytes as stored, weights of the logical shape) of a parsed header."""
    out: Tensors = {}
    for name, t in header.tensors.items():
        n = 1
        for d in t.shape:
            n *= int(d)
        out[name] = (t.nbytes, n)
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoeinfError(f"{path} is unreadable ({e}); check the checkpoint") from None


def _local(path: Path) -> ModelShape:
    from engine.store.hub import shard_names

    config = _read_json(path / "config.json")
    tensors: Tensors = {}
    for shard in shard_names(path):
        try:
            tensors.update(_header_tensors(read_header(path / shard, hint="the checkpoint is incomplete")))
        except OSError as e:
            raise MoeinfError(f"{path / shard} is unreadable ({e}); the checkpoint is incomplete") from None
    return shape_from(path.name, "local", config, tensors)


def _store(root: Path) -> ModelShape:
    from engine.store.paths import expert_shard_path

    config = _read_json(root / "config.json")
    dense: Tensors = {}
    for f in sorted((root / "dense").glob("*.safetensors")):
        dense.update(_header_tensors(read_header(f)))
    layout = moe_layout(config)
    expert_bytes = None
    if layout.is_moe:
        ref = expert_shard_path(root, layout.moe_layers[0], 0)
        if ref.is_file():
            expert_bytes = sum(b for b, _ in _header_tensors(read_header(ref)).values())
    shape = shape_from(
        root.name,
        "store",
        config,
        {},
        expert_bytes=expert_bytes,
        dense_bytes=sum(b for b, _ in dense.values()),
        store_name=root.name,
    )
    shape.dense_params = sum(n for _, n in dense.values())
    return shape


def _gguf(path: Path) -> ModelShape:
    from engine.store.gguf import _arch_config, _open, read_metadata

    reader = _open(path)
    tensors: Tensors = {t.name: (int(t.n_bytes), int(t.n_elements)) for t in reader.tensors}
    config = _arch_config(read_metadata(reader), set(tensors))
    return shape_from(path.stem, "gguf", config, tensors)


def _ranged(url: str, start: int, end: int) -> bytes:
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}"}
    r = get_session().get(url, headers=headers, follow_redirects=True)
    hf_raise_for_status(r)
    return r.content[: end - start + 1] if r.status_code == 206 else r.content[start : end + 1]


def remote_header(repo: str, filename: str, revision: str | None = None) -> SafetensorsHeader:
    """The safetensors header of ``filename`` in ``repo``: two ranged reads, no tensor data."""
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo, filename, revision=revision)
    (n,) = struct.unpack("<Q", _ranged(url, 0, 7))
    if not 0 < n < 100 << 20:
        raise MoeinfError(f"{repo}/{filename} does not start with a safetensors header")
    hint = "the repo's checkpoint is damaged; try another revision"
    return parse_header(struct.pack("<Q", n) + _ranged(url, 8, 8 + n - 1), f"{repo}/{filename}", hint)


def _hub(repo: str, revision: str | None = None) -> ModelShape:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from engine.store.hub import SINGLE_SHARD, hub_errors

    with hub_errors(repo, revision):
        config = _read_json(Path(hf_hub_download(repo, "config.json", revision=revision)))
        try:
            index = _read_json(Path(hf_hub_download(repo, "model.safetensors.index.json", revision=revision)))
            shards = sorted(set((index.get("weight_map") or {}).values()))
        except EntryNotFoundError:
            shards = [SINGLE_SHARD]
        tensors: Tensors = {}
        for shard in shards:
            tensors.update(_header_tensors(remote_header(repo, shard, revision)))
    return shape_from(repo, "hub", config, tensors)


def read_shape(model: str) -> ModelShape:
    """The shape of MODEL: a store name or directory, a checkpoint directory, a GGUF, an alias or a hub repo."""
    from engine.store.manifest import MANIFEST, store_names
    from engine.store.paths import models_dir
    from engine.store.pull import classify_source

    if model in store_names():
        return _store(models_dir() / model)
    p = Path(model).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        return _store(p)
    kind, value = classify_source(model)
    if kind == "gguf":
        return _gguf(Path(value))
    if kind == "local":
        if not (Path(value) / "config.json").is_file():
            raise MoeinfError(f"{value} has no config.json; give a Hugging Face checkpoint directory")
        return _local(Path(value))
    return _hub(value)
