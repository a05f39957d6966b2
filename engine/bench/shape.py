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
    head_bytes: int = 0  # the LM head (the embedding when tied): multiplied once per sequence a forward
    head_params: int = 0
    embed_bytes: int = 0  # the input embedding (looked up, not multiplied)
    compute_dtype: str = "bf16"  # activations: "bf16" or "f32" (what the model computes in by default)
    expert_file_bytes: int = 0  # one expert shard as stored (header included; 0: unknown)
    head_tied: bool = False  # the LM head is the input embedding
    expert_format: str | None = None  # the experts' tensor format where the headers name it
    # (format, bytes) of each of one expert's weight matrices, where the headers tell (a store model): a
    # pull that cannot block a matrix (a row not a whole number of the format's blocks) keeps it in bf16
    expert_matrices: tuple[tuple[str, int], ...] = ()

    @property
    def layer_dense_bytes(self) -> int:
        """Dense weights the decoder layers multiply every token by (attention, routers, shared experts)."""
        return max(0, self.dense_bytes - self.embed_bytes - (0 if self.head_tied else self.head_bytes))

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

        return replace(self, expert_bytes=int(self.expert_params * bits_per_weight / 8), expert_file_bytes=0,
                       expert_matrices=())

    @property
    def shard_bytes(self) -> int:
        """One expert shard's bytes (as stored, or its tensors plus a small header)."""
        return self.expert_file_bytes or self.expert_bytes + 4096


def kv_bytes_per_token(config: dict, elem: int = 2) -> int:
    import torch

    from engine.memory.open import kv_bytes

    return kv_bytes(config, 1, {2: torch.bfloat16, 4: torch.float32}.get(elem, torch.bfloat16))


def _is_expert_tensor(name: str) -> bool:
    low = name.lower()
    return ("experts." in low or "_exps" in low) and "shared" not in low


def _is_embed(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("token_embd")


def _is_head(name: str) -> bool:
    return name.endswith("lm_head.weight") or name == "output.weight"


def _head_split(config: dict, tensors: Tensors) -> tuple[int, int, int, bool]:
    """(head bytes, head weights, embedding bytes, tied) of the dense ``tensors``; a tied head is the embedding."""
    embed = [(b, n) for k, (b, n) in tensors.items() if _is_embed(k)]
    head = [(b, n) for k, (b, n) in tensors.items() if _is_head(k)]
    eb = sum(b for b, _ in embed)
    if head:
        return sum(b for b, _ in head), sum(n for _, n in head), eb, False
    if embed and config.get("tie_word_embeddings", True):
        return eb, sum(n for _, n in embed), eb, True
    return 0, 0, eb, False


def _compute_dtype(config: dict, stored: str | None = None) -> str:
    """"f32" when the model computes in float32 by default (float32 weights, or a GGUF's kept blocks), else "bf16"."""
    name = str(stored or config.get("torch_dtype") or config.get("dtype") or "bfloat16").lower()
    return "f32" if name in ("float32", "f32", "torch.float32") else "bf16"


def shape_from(
    name: str,
    source: str,
    config: dict,
    tensors: Tensors,
    expert_bytes: int | None = None,
    dense_bytes: int | None = None,
    store_name: str | None = None,
    dense_tensors: Tensors | None = None,
    stored_dtype: str | None = None,
    expert_file_bytes: int = 0,
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
    dense_only = dense_tensors if dense_tensors is not None else {
        k: v for k, v in tensors.items() if not _is_expert_tensor(k)
    }
    head_b, head_n, embed_b, tied = _head_split(config, dense_only)
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
        head_bytes=head_b,
        head_params=head_n,
        embed_bytes=embed_b,
        compute_dtype=_compute_dtype(config, stored_dtype),
        expert_file_bytes=expert_file_bytes,
        head_tied=tied,
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
    file_bytes = 0
    expert_format = None
    weights: list[tuple[str, int]] = []
    if layout.is_moe:
        ref = expert_shard_path(root, layout.moe_layers[0], 0)
        if ref.is_file():
            header = read_header(ref)
            expert_bytes = sum(b for b, _ in _header_tensors(header).values())
            file_bytes = ref.stat().st_size
            weights = [(t.format, int(t.nbytes)) for name, t in sorted(header.tensors.items())
                       if name.endswith("weight")]
            formats = {f for f, _ in weights}
            expert_format = formats.pop() if len(formats) == 1 else None
    manifest = _read_json(root / "manifest.json") if (root / "manifest.json").is_file() else {}
    shape = shape_from(
        root.name,
        "store",
        config,
        {},
        expert_bytes=expert_bytes,
        dense_bytes=sum(b for b, _ in dense.values()),
        store_name=root.name,
        dense_tensors=dense,
        stored_dtype=manifest.get("dtype"),
        expert_file_bytes=file_bytes,
    )
    shape.dense_params = sum(n for _, n in dense.values())
    shape.expert_format = expert_format
    shape.expert_matrices = tuple(weights)
    return shape


def _gguf(path: Path) -> ModelShape:
    from engine.store.gguf import _arch_config, _open, read_metadata

    reader = _open(path)
    tensors: Tensors = {t.name: (int(t.n_bytes), int(t.n_elements)) for t in reader.tensors}
    config = _arch_config(read_metadata(reader), set(tensors))
    return shape_from(path.stem, "gguf", config, tensors, stored_dtype="float32")


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
