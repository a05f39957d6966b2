"""The opened model: everything a run needs to know about a store model, read once.

``open_model(name_or_path)`` resolves a store name (or a store directory) and returns a
``StoreModel``: its manifest, its config.json, its MoE layout, every dense tensor as a ``TensorInfo``
(file, dtype and format, shape, byte range) and the tensors every expert shard holds (read from the
first expert shard of each MoE layer: the converter writes the shards of one layer with one header
layout; layers may differ in their tensors' formats, as a llama.cpp Q4_K_M file keeps some layers'
``ffn_down`` in Q6_K and the others in Q4_K).
The loader, the expert cache, the session and the bench take this object instead of a path, so
nothing reads config.json or a safetensors header a second time.

``StoreModel.from_dir(path)`` opens a directory the converter wrote even before it has a
``manifest.json`` (tests, the pull itself); ``as_store_model`` accepts either form.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.store.config import read_config
from engine.store.dtypes import config_dtype, lookup
from engine.store.families import MoELayout, moe_layout
from engine.store.header import SafetensorsHeader, TensorInfo, parse_header, read_header
from engine.store.manifest import MANIFEST, read_manifest, resolve_model
from engine.store.paths import expert_shard_path, missing_shard_error

HINT = "pull the model again with `moeinf pull`"


def _checked_header(path: Path) -> SafetensorsHeader:
    """The header of a store file, with a truncated file (data past its end) refused."""
    header = read_header(path, hint=HINT)
    size = path.stat().st_size
    if header.data_end > size:
        raise MoeinfError(f"{path} is truncated ({size} bytes, its header needs {header.data_end}); {HINT}")
    return header


@dataclass(frozen=True, eq=False)
class StoreModel:
    """A store model opened for running (see the module docstring). Build it with ``open_model``."""

    root: Path
    manifest: dict
    config: dict
    dense: dict[str, TensorInfo] = field(repr=False)  # every dense tensor by its stored name

    @classmethod
    def from_dir(cls, root: str | Path) -> StoreModel:
        """Open the store directory ``root`` (its manifest is read when it has one)."""
        root = Path(root)
        manifest = read_manifest(root) if (root / MANIFEST).is_file() else {}
        config = read_config(root, hint=HINT)
        files = sorted((root / "dense").glob("*.safetensors"))
        if not files:
            raise MoeinfError(f"no dense weights under {root}/dense; {HINT}")
        dense: dict[str, TensorInfo] = {}
        for f in files:
            dense.update(_checked_header(f).tensors)
        return cls(root, manifest, config, dense)

    # -- what it is ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.manifest.get("name") or self.root.name)

    @property
    def model_type(self) -> str | None:
        mt = self.config.get("model_type")
        return str(mt) if mt else None

    @functools.cached_property
    def layout(self) -> MoELayout:
        """Where the routed experts are (``engine.store.families.moe_layout`` of the config)."""
        try:
            return moe_layout(self.config)
        except (KeyError, TypeError, ValueError) as e:
            raise MoeinfError(
                f"{self.root / 'config.json'} is incomplete or malformed ({e!r}); {HINT}"
            ) from None

    @property
    def is_moe(self) -> bool:
        return self.layout.is_moe

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The float dtype the weights are stored in (the manifest's, else the config's), if known."""
        return lookup(self.manifest.get("dtype")) or config_dtype(self.config)

    # -- where its bytes are ------------------------------------------------------------------

    @property
    def dense_files(self) -> list[Path]:
        return sorted({t.file for t in self.dense.values() if t.file is not None})

    def expert_path(self, layer: int, expert: int) -> Path:
        """The shard of routed expert ``expert`` of decoder layer ``layer``."""
        return expert_shard_path(self.root, layer, expert)

    @functools.cached_property
    def expert_header(self) -> SafetensorsHeader:
        """The header of the first MoE layer's expert shards; MoeinfError for a dense model."""
        return self.layer_expert_header(self.layout.moe_layers[0] if self.is_moe else 0)

    def layer_expert_header(self, layer: int) -> SafetensorsHeader:
        """The header every expert shard of MoE layer ``layer`` shares (read from its expert 0, once)."""
        if not self.is_moe:
            raise MoeinfError(f"{self.name} is a dense model: it has no routed experts")
        cache = self.__dict__.setdefault("_layer_headers", {})
        if layer not in cache:
            cache[layer] = _checked_header(self.expert_path(layer, 0))
        return cache[layer]

    @property
    def expert_tensors(self) -> dict[str, TensorInfo]:
        """The tensors of one expert shard of the first MoE layer, by name (names and shapes are the same
        in every layer; formats may differ by layer: ``layer_expert_tensors``)."""
        return self.expert_header.tensors

    def layer_expert_tensors(self, layer: int) -> dict[str, TensorInfo]:
        """The tensors of one expert shard of MoE layer ``layer`` (offsets as in each of its shards)."""
        return self.layer_expert_header(layer).tensors

    @functools.cached_property
    def expert_file_bytes(self) -> int:
        """Size of the largest expert shard file (the first expert of each MoE layer)."""
        return max(self.expert_path(layer, 0).stat().st_size for layer in self.layout.moe_layers)

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The tensors of one expert shard on the CPU, in their stored dtype (views of one buffer read
        whole). A missing, truncated or damaged shard, or one whose tensors differ from the other experts
        of its layer, is a MoeinfError."""
        path = self.expert_path(layer, expert)
        try:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                got = f.readinto(buf)
        except FileNotFoundError:
            raise missing_shard_error(path, HINT) from None
        except OSError as e:
            raise MoeinfError(f"cannot read expert shard {path} ({e.strerror or e}); {HINT}") from None
        header = parse_header(buf, path, hint=HINT)
        if got < len(buf) or header.data_end > len(buf):
            raise MoeinfError(f"expert shard {path} is truncated; {HINT}")
        mine = {k: (t.dtype, t.stored_shape, t.format) for k, t in header.tensors.items()}
        if mine != {k: (t.dtype, t.stored_shape, t.format) for k, t in self.layer_expert_tensors(layer).items()}:
            raise MoeinfError(f"expert shard {path} does not match the model's other experts; {HINT}")
        whole = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return {
            k: whole[t.start : t.end].view(t.torch_dtype).view(t.stored_shape) for k, t in header.tensors.items()
        }

    def dense_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the dense weights once loaded with float tensors in ``dtype``."""
        esize = torch.empty((), dtype=dtype).element_size()
        total = 0
        for t in self.dense.values():
            stored = t.torch_dtype
            n = t.nbytes // max(1, stored.itemsize)
            total += n * (esize if stored.is_floating_point else stored.itemsize)
        return total


def open_model(name_or_path: str | Path | StoreModel) -> StoreModel:
    """The ``StoreModel`` of a store name or store directory (unknown names: a MoeinfError with hints)."""
    if isinstance(name_or_path, StoreModel):
        return name_or_path
    return StoreModel.from_dir(resolve_model(name_or_path))


def as_store_model(model: str | Path | StoreModel) -> StoreModel:
    """``model`` itself, or the store directory it names opened (no store-name lookup)."""
    return model if isinstance(model, StoreModel) else StoreModel.from_dir(model)
