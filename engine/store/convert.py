"""Hugging Face checkpoint shards -> store model (dense parts + one safetensors shard per routed expert).

``Converter`` takes source shards one at a time (``convert_shard``) and reads one tensor at a time, so
the extra memory is about one tensor (plus the pieces of experts whose matrices straddle two source
shards). What it cannot finish within a shard (an expert whose ``down_proj`` is in the next shard, an
FP8 weight whose scale is elsewhere) it keeps as *pending* and can save to / restore from a file, which
is what lets an interrupted pull resume after the last finished shard.

Source tensor names handled, as the family (``engine.store.families.Family``) names them (its MoE
block's module is renamed ``mlp``, e.g. Mixtral's ``block_sparse_moe``):
* per expert: ``model.layers.L.mlp.experts.E.<projection>.{weight,bias}``, the projection one of the
  family's ``projections`` (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/``w2``)
* fused: ``model.layers.L.mlp.experts.gate_up_proj`` and ``down_proj`` (and ``_bias``), split by the
  family's ``split_fused`` (transformers' [E, 2I, H] halves by default; gpt-oss interleaves)
* quantised: ``<x>_blocks`` + ``<x>_scales`` (MXFP4: kept as mxfp4, regrouped losslessly), FP8
  ``<x>.weight`` + ``<x>.weight_scale_inv`` (stored as q8_0); both dequantised instead when ``dtype``
  is asked for; block-format tensors of a GGUF-made checkpoint (U8 + ``moeinf.formats`` metadata,
  ``engine.formats.storage``) pass through as they are
* anything else under ``model.layers.L`` with L >= num_hidden_layers (DeepSeek-V3's MTP layer) is dropped
* everything else is dense and goes to ``dense/part-<k>.safetensors`` for source shard k; the
  family's ``keep_fp32`` tensors keep their source dtype.

``quantize`` (a format name) quantises the float weight matrices of every expert as they are
written (one expert in memory at a time); ``quantize_dense`` does the same for the dense 2-D weights
(routers excepted: they stay float, as llama.cpp keeps them). A matrix whose rows are not whole blocks
of the format stays float. ``formats`` records the format of every tensor written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import formats as tensor_formats
from engine.errors import MoeinfError
from engine.formats import storage
from engine.formats.mxfp4 import from_gpt_oss
from engine.formats.tensor import QuantTensor
from engine.store.dtypes import config_dtype
from engine.store.families import MoELayout, expert_tensor_shapes, family_of
from engine.store.files import WrittenFile, sha256_file
from engine.store.header import ALIGN, read_header
from engine.store.paths import expert_shard_path
from engine.store.quant import dequant_fp8_blocks, dequant_mxfp4
from engine.store.shards import TensorSpec, build_header, write_tensors

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_PER_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.(weight|bias)$")
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")
class SpillingShardWriter:
    """A safetensors file built from tensors whose list is not known up front, at about one tensor of memory:
    data is appended to a side file, then the header is written and the data copied behind it."""

    def __init__(self, path: Path, align: int = 8):
        self.path = path
        self.align = align
        self.specs: list[TensorSpec] = []
        self.formats: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._data_path = path.with_name(path.name + ".data")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._data = open(self._data_path, "wb")

    def add(self, name: str, tensor: torch.Tensor | QuantTensor) -> None:
        t, entry = storage.stored_form(tensor)
        if entry is not None:
            self.formats[name] = entry
        t = t.detach().contiguous()
        self.specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
        if t.numel():
            self._data.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))

    def finish(self) -> WrittenFile | None:
        self._data.close()
        try:
            if not self.specs:
                return None
            h = hashlib.sha256()
            tmp = self.path.with_name(self.path.name + ".tmp")
            header = build_header(self.specs, self.align, storage.metadata(self.formats))
            size = 0
            with open(tmp, "wb") as out, open(self._data_path, "rb") as data:
                for block in _chunks(header, data):
                    out.write(block)
                    h.update(block)
                    size += len(block)
            os.replace(tmp, self.path)
            return WrittenFile("", size, h.hexdigest())
        finally:
            self._data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self._data.close()
        self._data_path.unlink(missing_ok=True)


def _chunks(header: bytes, data, chunk: int = 16 << 20):
    yield header
    while block := data.read(chunk):
        yield block


@dataclass
class Converter:
    """Converts source shards of one checkpoint into ``out_dir`` (see the module docstring)."""

    config: dict
    out_dir: Path
    dtype: torch.dtype | None = None  # None: keep the source dtype
    on_bytes: Callable[[int], None] | None = None  # progress: source bytes processed
    quantize: str | None = None  # format of the expert matrices (None: as the source)
    quantize_dense: str | None = None  # format of the dense 2-D weights (None: as the source)
    layout: MoELayout = field(init=False)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # quantised parts waiting for their partner
    pieces: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    experts_done: set[tuple[int, int]] = field(default_factory=set)
    stored_dtype: torch.dtype | None = None
    source_dtype: torch.dtype | None = None
    dequantized: str | None = None
    dropped: int = 0
    formats: dict[str, dict[str, str]] = field(default_factory=lambda: {"experts": {}, "dense": {}})

    def __post_init__(self) -> None:
        self.requested_dtype = self.dtype  # None: keep quantised sources quantised
        self.spec = family_of(self.config)
        self.layout = self.spec.moe_layout(self.config)
        self.family = self.layout.family
        self.required = self.spec.expert_tensors
        self.moe_layers = set(self.layout.moe_layers)
        qc = self.config.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))
        self.compute_dtype = config_dtype(self.config) or torch.bfloat16
        if qc and self.dtype is None:  # a quantised source: every float tensor becomes the compute dtype
            self.dtype = self.compute_dtype

    # ---- one source shard -------------------------------------------------------------------
    def convert_shard(self, path: Path, index: int) -> list[WrittenFile]:
        """Convert every tensor of source shard ``path`` (the ``index``-th, 1-based); returns files written."""
        from safetensors import safe_open

        written: list[WrittenFile] = []
        dense = SpillingShardWriter(self.out_dir / "dense" / f"part-{index:05d}.safetensors", align=ALIGN)
        try:
            entries = read_header(path, hint=None).in_data_order()
            kept = {t.name: (t.format, t.shape) for t in entries if t.quantised}
            with safe_open(str(path), framework="pt") as f:
                for entry in entries:
                    tensor = storage.as_stored(entry.name, f.get_tensor(entry.name), kept)
                    nbytes = entry.nbytes
                    for out_name, t in self._decode(entry.name, tensor):
                        self._route(out_name, t, dense, written)
                    del tensor
                    if self.on_bytes:
                        self.on_bytes(nbytes)
        except BaseException:
            dense.abort()
            raise
        part = dense.finish()
        if part is not None:
            part.rel = f"dense/part-{index:05d}.safetensors"
            written.append(part)
        return written

    def _cast(self, name: str, t: torch.Tensor, quantised: bool = False) -> torch.Tensor:
        if isinstance(t, QuantTensor):
            return t if self.requested_dtype is None else t.dequantize(self.requested_dtype)
        keep = self.spec.keep_fp32
        if not t.is_floating_point() or (keep and name.endswith(keep)):
            return t
        target = self.dtype or (self.compute_dtype if quantised else t.dtype)
        return t.to(target)

    def _decode(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Source tensor -> zero or more (normalised name, full-precision tensor) once its unit is complete."""
        if self.spec.moe_module != "mlp":
            name = name.replace(f".{self.spec.moe_module}.", ".mlp.")
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= self.layout.num_layers:
            self.dropped += 1
            return []
        if isinstance(t, QuantTensor):
            self.source_dtype = self.source_dtype or torch.uint8
            return [(name, self._cast(name, t))]
        if name.endswith("_scale_inv"):
            self.raw[name] = t
            return self._complete_fp8(name.removesuffix("_scale_inv"))
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            self.raw[name] = t
            return self._complete_fp8(name)
        if name.endswith("_blocks") or name.endswith("_scales"):
            self.raw[name] = t
            return self._complete_mxfp4(name.rsplit("_", 1)[0])
        if self.source_dtype is None and t.is_floating_point() and (_PER_EXPERT_RE.match(name) or _FUSED_RE.match(name)):
            self.source_dtype = t.dtype
        return [(name, self._cast(name, t))]

    def _complete_fp8(self, base: str) -> list[tuple[str, torch.Tensor]]:
        scale_name = base + "_scale_inv"
        if base not in self.raw or scale_name not in self.raw:
            return []
        w, s = self.raw.pop(base), self.raw.pop(scale_name)
        if self.dequantized != "fp8->q8_0":
            self.dequantized = "fp8"
        self.source_dtype = self.source_dtype or w.dtype
        if self.requested_dtype is None and w.shape[-1] % tensor_formats.get("q8_0").block == 0:
            self.dequantized = "fp8->q8_0"
            values = dequant_fp8_blocks(w, s, self.fp8_block, torch.float32)
            return [(base, QuantTensor.quantise(values, tensor_formats.get("q8_0")))]
        out_dtype = self.dtype or self.compute_dtype
        return [(base, dequant_fp8_blocks(w, s, self.fp8_block, out_dtype))]

    def _complete_mxfp4(self, base: str) -> list[tuple[str, torch.Tensor]]:
        b, s = base + "_blocks", base + "_scales"
        if b not in self.raw or s not in self.raw:
            return []
        blocks, scales = self.raw.pop(b), self.raw.pop(s)
        self.source_dtype = self.source_dtype or torch.uint8
        if self.requested_dtype is None:  # kept: [E, rows, cols] in nn.Linear layout, blocks along cols
            raw = from_gpt_oss(blocks, scales)
            fmt = tensor_formats.get("mxfp4")
            return [(base, QuantTensor(raw, fmt, fmt.logical_shape(tuple(raw.shape))))]
        self.dequantized = "mxfp4"
        return [(base, dequant_mxfp4(blocks, scales, self.dtype))]

    def _route(self, name: str, t: torch.Tensor, dense: SpillingShardWriter, written: list[WrittenFile]) -> None:
        m = _PER_EXPERT_RE.match(name)
        if m:
            layer, expert, proj, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            self._add_piece(layer, expert, f"{self.spec.projections.get(proj, proj)}.{kind}", t, written)
            return
        m = _FUSED_RE.match(name)
        if m:
            layer, which, bias = int(m.group(1)), m.group(2), bool(m.group(3))
            for e, piece, sub in self._split_fused(which, bias, t):
                self._add_piece(layer, e, piece, sub, written)
            return
        if self.quantize_dense and not isinstance(t, QuantTensor) and _quantisable(name, t):
            t = _quantised(t, tensor_formats.get(self.quantize_dense))
        self._record("dense", name, t)
        dense.add(name, t)

    def _record(self, kind: str, name: str, t: torch.Tensor | QuantTensor) -> None:
        fmt = t.format if isinstance(t, QuantTensor) else tensor_formats.of_dtype(t.dtype) if t.is_floating_point() else None
        self.formats[kind][name] = fmt.name if fmt is not None else str(t.dtype).removeprefix("torch.")

    def _split_fused(self, which: str, bias: bool, t: torch.Tensor):
        if bias and not any(p.endswith(".bias") for p in self.required):
            raise MoeinfError(f"unexpected fused expert bias {which}_bias in a {self.family} checkpoint")
        return self.spec.split_fused(which, bias, t, self.layout.expert_intermediate_size)

    def _add_piece(self, layer: int, expert: int, piece: str, t: torch.Tensor, written: list[WrittenFile]) -> None:
        if layer not in self.moe_layers or not 0 <= expert < self.layout.num_experts:
            raise MoeinfError(
                f"checkpoint has expert {expert} of layer {layer}, but its config.json says layers "
                f"{sorted(self.moe_layers)} have {self.layout.num_experts} experts; the checkpoint is inconsistent"
            )
        if piece not in self.required:
            raise MoeinfError(f"unexpected expert tensor {piece} in layer {layer} of a {self.family} checkpoint")
        got = self.pieces.setdefault((layer, expert), {})
        got[piece] = t
        if all(p in got for p in self.required):
            self._write_expert(layer, expert, self.pieces.pop((layer, expert)), written)

    def _write_expert(self, layer: int, expert: int, got: dict[str, torch.Tensor], written: list[WrittenFile]) -> None:
        inter, hidden = self.layout.expert_intermediate_size, self.layout.hidden_size
        expect = expert_tensor_shapes(hidden, inter)
        if self.quantize:
            fmt = tensor_formats.get(self.quantize)
            got = {p: _quantised(t, fmt) if p.endswith(".weight") and not isinstance(t, QuantTensor) else t
                   for p, t in got.items()}
        for p in self.required:
            if tuple(got[p].shape) != expect[p]:
                raise MoeinfError(
                    f"expert {expert} of layer {layer}: {p} has shape {tuple(got[p].shape)}, config.json implies "
                    f"{expect[p]}; the checkpoint does not match its config"
                )
        path = expert_shard_path(self.out_dir, layer, expert)
        for p in self.required:
            self._record("experts", p, got[p])
        w = write_tensors(path, [(p, got[p]) for p in self.required], align=ALIGN)
        self.stored_dtype = self.stored_dtype or _float_dtype(got)
        self.experts_done.add((layer, expert))
        written.append(WrittenFile(path.relative_to(self.out_dir).as_posix(), w.size, w.sha256))

    # ---- pending state (for resume) ---------------------------------------------------------
    def pending_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"raw::{k}": v.clone() for k, v in self.raw.items()}
        for (layer, e), got in self.pieces.items():
            for p, v in got.items():
                if isinstance(v, QuantTensor):  # the format and logical shape ride in the key
                    shape = ",".join(map(str, v.shape))
                    out[f"qpiece::{layer}::{e}::{p}::{v.format.name}::{shape}"] = v.raw.clone()
                else:
                    out[f"piece::{layer}::{e}::{p}"] = v.clone()
        return out

    def restore_pending(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, v in tensors.items():
            kind, _, rest = key.partition("::")
            if kind == "raw":
                self.raw[rest] = v
            elif kind == "qpiece":
                layer, e, p, fmt, shape = rest.split("::")
                qt = QuantTensor(v, tensor_formats.get(fmt), tuple(int(d) for d in shape.split(",")))
                self.pieces.setdefault((int(layer), int(e)), {})[p] = qt
            else:
                layer, e, p = rest.split("::")
                self.pieces.setdefault((int(layer), int(e)), {})[p] = v

    def missing(self) -> list[str]:
        """What the source lacked, once every shard is converted (empty when complete)."""
        out = [f"{k} (its quantisation partner is missing)" for k in sorted(self.raw)]
        for (layer, e), got in sorted(self.pieces.items()):
            out.append(f"layer {layer} expert {e}: {', '.join(p for p in self.required if p not in got)}")
        for layer in sorted(self.moe_layers):
            for e in range(self.layout.num_experts):
                if (layer, e) not in self.experts_done and (layer, e) not in self.pieces:
                    out.append(f"layer {layer} expert {e}")
        return out


def _quantisable(name: str, t: torch.Tensor) -> bool:
    """A dense tensor ``--quantize-dense`` quantises: a float matrix that is not a router."""
    return t.is_floating_point() and t.dim() == 2 and name.endswith(".weight") and not _ROUTER_RE.search(name)


_ROUTER_RE = re.compile(r"\.mlp\.(gate|router)\.weight$|shared_expert_gate\.weight$")


def _quantised(t: torch.Tensor, fmt) -> torch.Tensor | QuantTensor:
    """``t`` packed into ``fmt`` when its rows are whole blocks of it; else ``t`` unchanged."""
    if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] % fmt.block:
        return t
    return QuantTensor.quantise(t.to(torch.float32), fmt)


def _float_dtype(got: dict[str, torch.Tensor | QuantTensor]) -> torch.dtype | None:
    """The dtype of an expert's float tensors (None when all are block-quantised)."""
    return next((t.dtype for t in got.values() if not isinstance(t, QuantTensor)), None)


def disk_full_error(out_dir: Path, err: OSError) -> MoeinfError:
    """Remove the partial output and explain, for ENOSPC/EDQUOT while writing."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return MoeinfError(
        f"disk full while writing {out_dir.parent} ({err.strerror}); the partial model was removed, "
        "free some space (or set MOEINF_HOME to a bigger disk) and pull again"
    )


__all__ = ["Converter", "WrittenFile", "sha256_file", "disk_full_error"]
