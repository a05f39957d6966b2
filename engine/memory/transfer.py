"""Slots and the copy primitive that fills them: the only part of the hierarchy that differs by device.

* CPU, store dtype == compute dtype (``DirectTransfer``): a slot is a page-aligned image of a whole
  shard file; one O_DIRECT read lands the tensors in place and the weights are views into it.
  Block-quantised tensors (``engine.formats``) are always kept as stored, so a quantised expert
  whose float tensors (biases) are in the compute dtype is a direct read too.
* CPU, other dtype (``ConvertTransfer``): a slot holds the compute-dtype tensors (quantised ones as
  stored); a worker reads the shard (O_DIRECT) into its own aligned staging buffer and converts into
  the slot.
* CUDA (``CudaTransfer``): the host tier is the memory-mapped shards; a worker copies (and converts)
  into a pinned staging buffer, then copies to the device slot on its own stream and records an event.
  The compute stream waits on that event before using the slot, and a slot's next load waits on the
  event recorded when the compute released it.

All slot memory is allocated once, when the cache opens; a load only copies into existing memory.
A model whose MoE layers store their experts in different formats (a llama.cpp Q4_K_M file keeps some
layers' ``ffn_down`` in Q6_K) has one ``ExpertLayout`` per distinct layer layout: slots are sized for
the largest, and a load views the slot with the layout its shard's header matches.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import MoeinfError
from engine.formats import storage
from engine.memory.shard import ShardReader, aligned_buffer, round_up
from engine.model.experts import ExpertWeights
from engine.store.header import ALIGN, STORE_HINT, SafetensorsHeader, TensorInfo, parse_header

FREE, LOADING, RESIDENT, STREAM = "free", "loading", "resident", "stream"
_NO_LAYOUT = object()


@dataclass(frozen=True)
class ExpertLayout:
    """The tensors of one expert shard (the opened model's ``expert_tensors``) and the compute dtype."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # name, stored shape, store dtype
    file_size: int
    compute_dtype: torch.dtype
    formats: tuple[tuple[str, str, tuple[int, ...]], ...] = ()  # name, block format, logical shape

    @staticmethod
    def _items(tensors: dict[str, TensorInfo]) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
        return tuple(sorted((k, v.stored_shape, v.torch_dtype) for k, v in tensors.items()))

    @classmethod
    def from_tensors(cls, tensors: dict[str, TensorInfo], file_size: int, compute_dtype: torch.dtype) -> ExpertLayout:
        kept = tuple(sorted((k, t.format, t.shape) for k, t in tensors.items() if t.quantised))
        return cls(cls._items(tensors), file_size, compute_dtype, kept)

    def quantised(self, name: str) -> bool:
        return any(n == name for n, _f, _s in self.formats)

    def slot_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype ``name`` has in a slot: as stored when block-quantised, else the compute dtype."""
        return dtype if self.quantised(name) else self.compute_dtype

    @property
    def same_dtype(self) -> bool:
        return all(self.slot_dtype(n, dt) == dt for n, _s, dt in self.tensors)

    def stored_bytes(self) -> int:
        """Bytes of one expert's tensor data as stored."""
        return sum(math.prod(s) * _esize(dt) for _n, s, dt in self.tensors)

    def compute_bytes(self) -> int:
        """Bytes of one expert in a slot (quantised tensors as stored, the others in the compute dtype),
        each tensor starting on a 64-byte boundary."""
        return sum(round_up(math.prod(s) * _esize(self.slot_dtype(n, dt)), 64) for n, s, dt in self.tensors)

    def weights(self, views: dict[str, torch.Tensor]) -> ExpertWeights:
        """The expert's weights from its tensors' views: block-quantised ones as ``QuantTensor``."""
        entries = {n: (f, s) for n, f, s in self.formats}
        return ExpertWeights.from_tensors({n: storage.as_stored(n, v, entries) for n, v in views.items()})

    def matches(self, header: SafetensorsHeader) -> bool:
        kept = tuple(sorted((k, t.format, t.shape) for k, t in header.tensors.items() if t.quantised))
        return self._items(header.tensors) == self.tensors and kept == self.formats

    def check(self, header: SafetensorsHeader, path: Path | str) -> None:
        if not self.matches(header):
            raise MoeinfError(
                f"expert shard {path} does not match the model's other experts; pull the model again"
            )


@dataclass(eq=False)
class Slot:
    """Preallocated memory for one expert, and what it holds now."""

    index: int
    stream: bool  # a streaming slot (prefill experts not admitted to the cache)
    nbytes: int
    key: tuple[int, int] | None = None
    state: str = FREE
    pins: int = 0
    prefetched: bool = False  # loaded ahead and not used yet
    weights: ExpertWeights | None = None
    raw: memoryview | None = None  # DirectTransfer: the shard image
    raw_t: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # Convert/Cuda: fixed views
    flat: torch.Tensor | None = None  # Convert/Cuda: the slot's memory, viewed by ``tensors``
    layout: object = _NO_LAYOUT  # Convert/Cuda: the ExpertLayout ``tensors`` view ``flat`` with
    image: object = None  # DirectTransfer: the shard header layout ``weights`` view ``raw`` with
    ready_event: object | None = None  # CUDA: the copy into this slot is done
    release_event: object | None = None  # CUDA: the compute stopped using this slot


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _flat_views(flat: torch.Tensor, layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """Views of each tensor inside one flat uint8 buffer of ``compute_bytes`` (64-byte aligned starts)."""
    views, off = {}, 0
    for name, shape, dt in layout.tensors:
        dtype = layout.slot_dtype(name, dt)
        n = math.prod(shape) * _esize(dtype)
        views[name] = flat[off : off + n].view(dtype).view(shape)
        off += round_up(n, 64)
    return views


class Transfer(ABC):
    """Base: allocates slots and fills one from a shard file. ``load`` runs on a worker thread.

    ``layout`` is the experts' layout; ``others`` those of MoE layers whose experts differ in their
    tensors' formats (slots fit the largest; see the module docstring)."""

    io = ""

    def __init__(self, layout: ExpertLayout, device: torch.device, others: tuple[ExpertLayout, ...] = ()):
        self.layouts = (layout, *(o for o in others if o != layout))
        self.layout = layout
        self.device = device
        self._headers: dict[str, tuple[SafetensorsHeader, ExpertLayout]] = {}
        self._local = threading.local()

    @property
    def slot_bytes(self) -> int:
        return max(lay.compute_bytes() for lay in self.layouts)

    @property
    def file_size(self) -> int:
        return max(lay.file_size for lay in self.layouts)

    @staticmethod
    def _view(slot: Slot, layout: ExpertLayout) -> None:
        """Point the slot's tensors (and weights) at its memory as ``layout`` lays it out."""
        if slot.layout is not layout:
            assert slot.flat is not None
            slot.tensors = _flat_views(slot.flat, layout)
            slot.weights = layout.weights(slot.tensors)
            slot.layout = layout

    @abstractmethod
    def make_slots(self, n: int, n_stream: int) -> list[Slot]:
        """Allocate ``n`` slots once (``n_stream`` of them for prefill streaming)."""

    @abstractmethod
    def load(self, slot: Slot, path: Path) -> int:
        """Fill ``slot`` with the shard at ``path``; returns the bytes moved (read or copied)."""

    def before_use(self, slot: Slot) -> None:
        """Called on the compute thread before the slot's weights are handed out."""

    def after_use(self, slot: Slot) -> None:
        """Called on the compute thread when the compute released the slot (its pins went to zero)."""

    def close(self) -> None:
        """Release every buffer this transfer allocated (called once the loader threads stopped and the
        slots were dropped); memory still viewed by a tensor someone keeps is freed with that tensor."""
        self._headers.clear()
        self._local = threading.local()

    def _header(self, path: Path, buf: memoryview | bytes, size: int) -> tuple[SafetensorsHeader, ExpertLayout]:
        """The parsed header of the shard just read (``size`` bytes into ``buf``) and the layout it
        matches, checked against the layouts and the file size (a truncated shard is an error, not
        garbage weights)."""
        key = str(path)
        got = self._headers.get(key)
        if got is None:
            h = parse_header(buf, path, hint=STORE_HINT)
            lay = next((lay for lay in self.layouts if lay.matches(h)), None)
            if lay is None:
                self.layout.check(h, path)  # raises: the one-line error
            assert lay is not None
            got = self._headers[key] = (h, lay)
        if got[0].data_end > size:
            raise MoeinfError(f"expert shard {path} is truncated; {STORE_HINT}")
        return got


class DirectTransfer(Transfer):
    """CPU, same dtype: O_DIRECT read of the whole shard into the slot; weights are views into it."""

    def __init__(self, layout: ExpertLayout, device: torch.device, direct: bool = True,
                 others: tuple[ExpertLayout, ...] = ()):
        super().__init__(layout, device, others)
        self.reader = ShardReader(direct)
        self._slot_bytes = round_up(self.file_size) + ALIGN  # one page of slack for header padding
        self._arena = None
        self._images: dict[str, tuple] = {}  # shard path -> (layout, tensor placement, size, interned pair)
        self._interned: dict[tuple, tuple] = {}

    @property
    def io(self) -> str:  # type: ignore[override]
        return self.reader.mode

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    def make_slots(self, n: int, n_stream: int) -> list[Slot]:
        self._arena = aligned_buffer(n * self._slot_bytes)
        mv = memoryview(self._arena)
        arena_t = torch.frombuffer(self._arena, dtype=torch.uint8)
        slots = []
        for i in range(n):
            a, b = i * self._slot_bytes, (i + 1) * self._slot_bytes
            slots.append(Slot(i, i >= n - n_stream, self._slot_bytes, raw=mv[a:b], raw_t=arena_t[a:b]))
        return slots

    def load(self, slot: Slot, path: Path) -> int:
        """Read the shard into the slot's image. When the slot's last shard had the same header layout
        (every tensor at the same offsets, in the same dtype and shape: the experts of one layer format
        all do) the bytes were overwritten in place and the slot keeps its views and ``ExpertWeights``,
        and with them the native call's checked entry (``cuda_ext.cpu._expert_entry``)."""
        assert slot.raw is not None and slot.raw_t is not None
        key = str(path)
        image = self._images.get(key)
        # a shard read before: its size is known (no fstat; a shorter file is still a truncation error)
        size = self.reader.read_into(path, slot.raw, None if image is None else image[2])
        header, layout = self._header(path, slot.raw, size)
        if image is None:
            items = tuple((n, t.start, t.end, t.torch_dtype, t.stored_shape) for n, t in header.tensors.items())
            placement = self._interned.setdefault((layout, items), (layout, items))
            image = self._images[key] = (*placement, size, placement)
        if slot.image is image[3] and slot.weights is not None:
            return size
        slot.weights = None
        views = {}
        for name, start, end, dtype, shape in image[1]:
            views[name] = slot.raw_t[start:end].view(dtype).view(shape)
        slot.weights = layout.weights(views)
        slot.image = image[3]
        return size

    def close(self) -> None:
        super().close()
        self._images.clear()
        self._interned.clear()
        arena, self._arena = self._arena, None
        if arena is not None:
            try:
                arena.close()  # unmapped now, not when the garbage collector gets to it
            except BufferError:  # a tensor still views it: unmapped when the last view goes
                pass


class ConvertTransfer(Transfer):
    """CPU, other dtype: O_DIRECT read into a per-worker staging buffer, converted into the slot."""

    def __init__(self, layout: ExpertLayout, device: torch.device, direct: bool = True,
                 others: tuple[ExpertLayout, ...] = ()):
        super().__init__(layout, device, others)
        self.reader = ShardReader(direct)
        self._staging_bytes = round_up(self.file_size) + ALIGN

    @property
    def io(self) -> str:  # type: ignore[override]
        return self.reader.mode

    def make_slots(self, n: int, n_stream: int) -> list[Slot]:
        per = self.slot_bytes
        arena = torch.empty(n * per, dtype=torch.uint8, device=self.device)
        arena.zero_()  # fault the pages in now, not in the decode loop
        slots = []
        for i in range(n):
            s = Slot(i, i >= n - n_stream, self.slot_bytes, flat=arena[i * per : (i + 1) * per])
            self._view(s, self.layout)
            slots.append(s)
        return slots

    def _staging(self) -> tuple[memoryview, torch.Tensor]:
        st = getattr(self._local, "staging", None)
        if st is None:
            buf = aligned_buffer(self._staging_bytes)
            st = self._local.staging = (memoryview(buf), torch.frombuffer(buf, dtype=torch.uint8), buf)
        return st[0], st[1]

    def load(self, slot: Slot, path: Path) -> int:
        mv, t = self._staging()
        size = self.reader.read_into(path, mv)
        header, layout = self._header(path, mv, size)
        self._view(slot, layout)
        for name, e in header.tensors.items():
            slot.tensors[name].copy_(t[e.start : e.end].view(e.torch_dtype).view(e.stored_shape))
        return size


class CudaTransfer(Transfer):
    """CUDA: memory-mapped shards -> pinned staging (converted) -> device slot on a copy stream + event."""

    io = "mmap+pinned->cuda"

    def __init__(self, layout: ExpertLayout, device: torch.device, others: tuple[ExpertLayout, ...] = ()):
        super().__init__(layout, device, others)
        self._maps: dict[str, torch.Tensor] = {}
        self._maps_lock = threading.Lock()

    def make_slots(self, n: int, n_stream: int) -> list[Slot]:
        per = self.slot_bytes
        arena = torch.empty(n * per, dtype=torch.uint8, device=self.device)
        slots = []
        for i in range(n):
            s = Slot(i, i >= n - n_stream, self.slot_bytes, flat=arena[i * per : (i + 1) * per])
            self._view(s, self.layout)
            s.ready_event = torch.cuda.Event()
            s.release_event = None
            slots.append(s)
        return slots

    def _mapped(self, path: Path) -> torch.Tensor:
        """The host tier: the shard file memory-mapped once (the page cache holds its pages)."""
        key = str(path)
        with self._maps_lock:
            t = self._maps.get(key)
            if t is None:
                import warnings

                import numpy as np

                arr = np.memmap(key, dtype=np.uint8, mode="r")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a read-only array: torch warns, and it is only read
                    t = self._maps[key] = torch.from_numpy(arr)
            return t

    def _worker_state(self) -> dict:
        st = getattr(self._local, "state", None)
        if st is None:
            staging = []
            for _ in range(2):  # double-buffered: fill one while the other is being copied
                flat = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                staging.append((flat, torch.cuda.Event()))
            st = self._local.state = {
                "stream": torch.cuda.Stream(device=self.device),
                "staging": staging,
                "next": 0,
            }
        return st

    def load(self, slot: Slot, path: Path) -> int:
        st = self._worker_state()
        flat, done = st["staging"][st["next"]]
        st["next"] ^= 1
        done.synchronize()  # the previous copy out of this staging buffer has finished
        mapped = self._mapped(path)
        header, layout = self._header(path, memoryview(mapped.numpy()[: 8 + 100_000]), mapped.numel())
        views = _flat_views(flat, layout)
        self._view(slot, layout)  # the compute released the slot before it was chosen for this load
        for name, e in header.tensors.items():
            views[name].copy_(mapped[e.start : e.end].view(e.torch_dtype).view(e.stored_shape))
        stream = st["stream"]
        with torch.cuda.stream(stream):
            if slot.release_event is not None:
                stream.wait_event(slot.release_event)  # the compute is done with what was here
            for name, dst in slot.tensors.items():
                dst.copy_(views[name], non_blocking=True)
            slot.ready_event.record(stream)
            done.record(stream)
        return self.slot_bytes

    def before_use(self, slot: Slot) -> None:
        torch.cuda.current_stream(self.device).wait_event(slot.ready_event)

    def close(self) -> None:
        super().close()
        with self._maps_lock:
            self._maps.clear()

    def after_use(self, slot: Slot) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        slot.release_event = ev


def make_transfer(
    layout: ExpertLayout, device: torch.device, direct: bool = True, others: tuple[ExpertLayout, ...] = ()
) -> Transfer:
    """The copy primitive for ``device``: CUDA when asked and available, else the CPU paths.
    ``others``: the layouts of MoE layers whose experts are stored in other formats."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoeinfError("CUDA was asked for but torch sees no GPU; use --device cpu")
        return CudaTransfer(layout, device, others)
    if all(lay.same_dtype for lay in (layout, *others)):
        return DirectTransfer(layout, device, direct, others)
    return ConvertTransfer(layout, device, direct, others)
