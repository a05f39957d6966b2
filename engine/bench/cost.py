"""The time of one forward of the engine on the CPU, from a model's shape, the machine profile and its accesses.

A forward of ``T`` tokens of ``S`` sequences (a decode step: ``T == S``; a prefill: a few prompts) costs:

* per decoder layer, the engine's own overhead ``a + b S + c T`` (``engine.bench.kernels.probe_overhead``,
  with every expert resident or behind the budgeted cache);
* the decoder layers' dense weights (attention, routers, shared experts) multiplied at ``T`` rows, and the
  LM head at ``S`` rows (each sequence's last token), at the probed seconds per byte of their format;
* per MoE layer, its experts: one token goes through its ``k`` experts in one native call (the probed
  per-expert cost of that call); several tokens run expert-major, each expert one product over the tokens
  routed to it (the probed fixed cost plus seconds per byte at that many tokens); an expert whose matrices are
  not all of one format (a quantising pull keeps a matrix in bf16 whose rows are not whole blocks) runs the
  Python path at every token count, each matrix at its own format's product rate;
* weights beyond the last-level cache: the probes' products ran on weights the cache holds; the share of a
  run's weights it cannot hold (dense + the experts resident) is read at no more than the memory's probed
  bandwidth;
* the policy's own work beyond the overhead probe's lru (``Forward.policy_extra_s``, timed on the dry run);
* the loads it waits for: per miss, what the engine's own cache achieved in the load probe
  (``engine.bench.kernels.probe_loads``: stall per load, and the extra compute a loaded expert costs) one
  sequence at a time (a miss blocks the layer) or streaming (a prefill, a batch), scaled from the probe's
  shard size to this one by the disk probe's read times. Prefetches run in the background and cost only
  what they exceed the forward's compute by.
"""

from __future__ import annotations

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
    """The rates a model's forwards use: its formats' kernels, its family's overhead, memory and the disk."""

    expert_decode: Rates
    expert_major: Rates
    dense: Rates
    head: Rates
    overhead: dict  # {"resident": [a, b, c], "offload": [a, b, c]} seconds per layer
    load: dict  # {"decode": (stall, extra compute) per load, "stream": ...} seconds, at this shard size
    read_pair_s: float  # one shard read with two in flight (prefetches)
    hot: float = 1.0  # share of the weights a run touches that the last-level cache holds
    dram_per_byte: float = 0.0  # seconds per byte streamed from memory (0: unknown)
    # experts whose matrices are not all of one format: (dense Rates of its format, bytes, its format's expert
    # probes) per matrix. The one-token native call declines them, so every token count runs the Python path:
    # each matrix at its format's product rate, plus a third of its format's fixed cost per expert (the
    # probes' experts have three matrices) on that path (one token: "python"; more: "major")
    mixed: tuple[tuple[Rates, int, dict], ...] = ()

    @classmethod
    def of(cls, shape, profile, expert_fmt: str, dense_fmt: str, head_fmt: str, working_set: float = 0.0) -> Costs:
        act = shape.compute_dtype
        k = _nearest(profile.kernels, f"{expert_fmt}/{act}")
        d = _nearest(profile.kernels, f"{dense_fmt}/{act}")
        h = _nearest(profile.kernels, f"{head_fmt}/{act}")
        oh = profile.overhead.get(shape.family) or profile.overhead.get(DEFAULT_FAMILY) or {
            "resident": [0.0, 0.0, 0.0], "offload": [0.0, 0.0, 0.0]}
        size = shape.shard_bytes
        raw = size / profile.disk_single_bps(size)
        load = {}
        probe = profile.loads or {}
        ref = probe.get("shard_bytes")
        for kind in ("decode", "stream"):
            if ref and kind in probe:
                # the engine's own load at the probe's shard size, scaled by the disk's read times
                scale = raw / (ref / profile.disk_single_bps(ref))
                load[kind] = (probe[kind]["load_s"] * scale, probe[kind]["load_compute_s"] * size / ref)
            else:
                load[kind] = (raw, 0.0)
        mixed: tuple[tuple[Rates, int, dict], ...] = ()
        if len({f for f, _ in shape.expert_matrices}) > 1:
            mixed = tuple(
                (m["dense"], b, m["experts"])
                for f, b in shape.expert_matrices
                for m in [_nearest(profile.kernels, f"{f}/{act}")]
            )
        llc = (profile.memory or {}).get("llc_bytes", 0)
        dram = (profile.memory or {}).get("dram_bps", 0.0)
        return cls(
            expert_decode=k["experts"]["decode"],
            expert_major=k["experts"]["major"],
            dense=d["dense"],
            head=h["dense"],
            overhead=oh,
            load=load,
            read_pair_s=size / profile.disk_bps(size),
            hot=min(1.0, llc / working_set) if working_set > 0 and llc else 1.0,
            dram_per_byte=1.0 / dram if dram else 0.0,
            mixed=mixed,
        )

    def seconds(self, rates: Rates, nbytes: float, tokens: float, hot: float | None = None) -> float:
        """``rates.seconds``, with the share of the weights not in the last-level cache read at no more than
        the memory's bandwidth."""
        t = rates.seconds(nbytes, tokens)
        share = self.hot if hot is None else hot
        if share >= 1.0 or not self.dram_per_byte:
            return t
        return share * t + (1 - share) * max(t, nbytes * self.dram_per_byte)

    def expert_seconds(self, nbytes: float, tokens: float, one_token: bool) -> float:
        """One expert over ``tokens`` tokens: the one-token native call (``one_token``), else expert-major;
        a mixed-format expert always the Python path, each matrix at its format's product rate."""
        if self.mixed:
            share = 1.0 / len(self.mixed)
            path = "python" if one_token else "major"
            return sum(self.seconds(d, b, tokens) + share * ex.get(path, ex["major"]).seconds(0, tokens)
                       for d, b, ex in self.mixed)
        return self.seconds(self.expert_decode if one_token else self.expert_major, nbytes, tokens)


def forward_time(shape, costs: Costs, fwd: Forward, offloaded: bool) -> ForwardTime:
    """Compute and load time of one forward (see the module doc)."""
    T, S = fwd.tokens, fwd.seqs
    a, b, c = costs.overhead["offload" if offloaded else "resident"]
    compute = shape.num_layers * (a + b * S + c * T) + fwd.policy_extra_s
    compute += costs.seconds(costs.dense, shape.layer_dense_bytes, T) + costs.seconds(costs.head, shape.head_bytes, S)
    io = 0.0
    size = shape.expert_bytes
    load_s, load_compute_s = costs.load["decode" if T == 1 else "stream"]
    for acc in fwd.layers:
        if T == 1:
            compute += acc.experts * costs.expert_seconds(size, 1, True)
        else:
            compute += sum(costs.expert_seconds(size, t, False) for t in acc.tokens)
        io += acc.misses * load_s
        compute += acc.misses * load_compute_s
    prefetch_io = fwd.prefetch_loads * costs.read_pair_s
    io += max(0.0, prefetch_io - compute)
    return ForwardTime(compute, io)
