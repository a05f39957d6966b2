"""The time of one forward of the engine on the CPU, from a model's shape, the machine profile and its accesses.

A forward of ``T`` tokens of ``S`` sequences (a decode step: ``T == S``; a prefill: a few prompts) costs:

* per decoder layer, the engine's own overhead ``a + b S + c T`` (``engine.bench.kernels.probe_overhead``,
  with every expert resident or behind the budgeted cache);
* the decoder layers' dense weights (attention, routers, shared experts) multiplied at ``T`` rows, and the
  LM head at ``S`` rows (each sequence's last token), at the probed seconds per byte of their format;
* per MoE layer, its experts: one token goes through its ``k`` experts in one native call (the probed
  per-expert cost of that call); several tokens run expert-major, each expert one product over the tokens
  routed to it (the probed fixed cost plus seconds per byte at that many tokens);
* the loads it waits for. One token (decode of one sequence): the layer's misses are read together (two
  workers) after its hits are handed out, and its experts run once all are in, so the wait adds in full.
  Several tokens (a prefill, a batch): the misses stream after the hits, two in flight, each computed as it
  lands, so the layer's misses cost the larger of their reads and their products. Prefetches run in the
  background and cost only what they exceed the forward's compute by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.bench.kernels import Rates
from engine.bench.simulate import Forward

DEFAULT_FAMILY = "mixtral"


@dataclass
class ForwardTime:
    compute_s: float
    io_s: float

    @property
    def total(self) -> float:
        return self.compute_s + self.io_s


def _nearest(table: dict, key: str) -> dict:
    if key in table:
        return table[key]
    fmt, act = key.split("/")
    same_act = [k for k in table if k.endswith("/" + act)]
    return table[same_act[0] if same_act else next(iter(table))]


@dataclass
class Costs:
    """The rates a model's forwards use: its formats' kernels, its family's overhead, the disk."""

    expert_decode: Rates
    expert_major: Rates
    dense: Rates
    head: Rates
    overhead: dict  # {"resident": [a, b, c], "offload": [a, b, c]} seconds per layer
    read_s: float  # one expert shard read alone
    read_pair_s: float  # two shard reads in flight (per read)

    @classmethod
    def of(cls, shape, profile, expert_fmt: str, dense_fmt: str, head_fmt: str) -> Costs:
        act = shape.compute_dtype
        k = _nearest(profile.kernels, f"{expert_fmt}/{act}")
        d = _nearest(profile.kernels, f"{dense_fmt}/{act}")
        h = _nearest(profile.kernels, f"{head_fmt}/{act}")
        oh = profile.overhead.get(shape.family) or profile.overhead.get(DEFAULT_FAMILY) or {
            "resident": [0.0, 0.0, 0.0], "offload": [0.0, 0.0, 0.0]}
        size = shape.shard_bytes
        return cls(
            expert_decode=k["experts"]["decode"],
            expert_major=k["experts"]["major"],
            dense=d["dense"],
            head=h["dense"],
            overhead=oh,
            read_s=size / profile.disk_single_bps(size),
            read_pair_s=size / profile.disk_bps(size),
        )

    def reads(self, n: int) -> float:
        """Seconds to read ``n`` shards with the loader's two workers."""
        if n <= 0:
            return 0.0
        return max(math.ceil(n / 2) * self.read_s, n * self.read_pair_s)


def forward_time(shape, costs: Costs, fwd: Forward, offloaded: bool) -> ForwardTime:
    """Compute and load time of one forward (see the module doc)."""
    T, S = fwd.tokens, fwd.seqs
    a, b, c = costs.overhead["offload" if offloaded else "resident"]
    compute = shape.num_layers * (a + b * S + c * T)
    compute += costs.dense.seconds(shape.layer_dense_bytes, T) + costs.head.seconds(shape.head_bytes, S)
    io = 0.0
    size = shape.expert_bytes
    for acc in fwd.layers:
        if T == 1:
            compute += acc.experts * costs.expert_decode.seconds(size, 1)
            io += costs.reads(acc.misses)
            continue
        per = [costs.expert_major.seconds(size, t) for t in acc.tokens]
        compute += sum(per)
        if acc.misses:
            miss_compute = sum(sorted(per)[: acc.misses])  # which experts missed is not kept: the cheapest
            io += max(0.0, costs.reads(acc.misses) - miss_compute)
    prefetch_io = fwd.prefetch_loads * costs.read_pair_s
    io += max(0.0, prefetch_io - compute)
    return ForwardTime(compute, io)
