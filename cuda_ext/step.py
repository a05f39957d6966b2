"""The decoder layers of one decode token in one native call (``csrc/cpu/step.c``): bf16, or (``*_f32``) a
float32 model whose attention and experts are block formats (a GGUF model).

``layer_struct(...)`` describes one pre-norm layer: its attention's plan (``cuda_ext.attention``, or
``cuda_ext.mla`` for multi-head latent attention), the two RMSNorms (bf16 weight, or gpt-oss's weight
applied in float32), the router (softmax top-k, gpt-oss's top-k then softmax, or DeepSeek-V3's grouped
sigmoid router; none for a dense layer), a pointer table of every routed expert of the layer (SiLU or
gpt-oss's clamped SwiGLU), and a shared expert or a dense layer's MLP. ``decode_layers(layers, x, cos,
sin, slot, pos, threads)`` runs them all for one token and returns the hidden state, every layer's
routing (ids and weights) and each layer's router input, for the expert source's hooks. The kernel
calls the same native pieces the layers call one by one, so the result is the same bits.
"""

from __future__ import annotations

import ctypes

import torch

from cuda_ext import loader

ROUTE_SOFTMAX, ROUTE_V3, ROUTE_NONE = 0, 1, 2
PROFILE_PARTS = ("attention", "router", "experts", "rest")  # step.c's PROF_* order


class Profile:
    """While it holds (``with Profile() as p``), every native step adds the seconds of each of its parts
    (attention, router, experts with a shared expert or a dense MLP, the rest: norms, residual adds, the
    loop) to ``p.seconds``; one clock read between parts, none when no profile is active."""

    def __init__(self):
        self._acc = (ctypes.c_double * len(PROFILE_PARTS))()

    @property
    def seconds(self) -> dict[str, float]:
        return dict(zip(PROFILE_PARTS, self._acc, strict=True))

    def __enter__(self) -> Profile:
        lib = loader.cpu()
        if lib is not None:
            lib.lib.moeinf_step_profile(self._acc)
        return self

    def __exit__(self, *exc) -> None:
        lib = loader.cpu()
        if lib is not None:
            lib.lib.moeinf_step_profile(None)


# the first fields of both layer structs (step.c's step_layer and step_f32_layer)
_HEAD = [
    ("attn", ctypes.c_void_p),
    ("in_norm", ctypes.c_void_p),
    ("post_norm", ctypes.c_void_p),
    ("eps", ctypes.c_float),
    ("k", ctypes.c_int),
    ("renorm", ctypes.c_int),
]


class _Layer(ctypes.Structure):
    _fields_ = [
        *_HEAD,
        ("bf16_weights", ctypes.c_int),
        ("type", ctypes.c_int),
        ("E", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("router", ctypes.c_void_p),
        ("router_bias", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("norm_f32w", ctypes.c_int),
        ("router_kind", ctypes.c_int),
        ("order", ctypes.c_int),
        ("act", ctypes.c_int),
        ("alpha", ctypes.c_float),
        ("limit", ctypes.c_float),
        ("attn_kind", ctypes.c_int),
        ("n_group", ctypes.c_int),
        ("topk_group", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("corr", ctypes.c_void_p),
        ("shared", ctypes.c_void_p * 6),
        ("shared_I", ctypes.c_int64),
    ]


class Layers:
    """The structs of a model's layers, kept with everything they point into."""

    def __init__(self, structs: list, keep: list, hidden: int):
        self.array = (type(structs[0]) * len(structs))(*structs)
        self.keep = keep
        self.hidden = hidden
        self.count = len(structs)
        self.topk = [self._routed(s) for s in structs]
        self.total_k = sum(self.topk)

    @staticmethod
    def _routed(s: _Layer) -> int:
        """The experts a token of this layer routes to (0: a dense layer)."""
        return 0 if s.router_kind == ROUTE_NONE else s.k


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def layer_struct(
    attn_plan,
    in_norm: torch.Tensor,
    post_norm: torch.Tensor,
    eps: float,
    router: torch.Tensor | None = None,
    router_bias: torch.Tensor | None = None,
    top_k: int = 0,
    renormalize: bool = False,
    bf16_weights: bool = False,
    entries: list[tuple] | None = None,
    *,
    mla: bool = False,
    norm_f32w: bool = False,
    route: int = ROUTE_SOFTMAX,
    topk_first: bool = False,
    clamped: tuple[float, float] | None = None,
    v3: tuple[torch.Tensor | None, int, int, float] | None = None,
    shared: tuple | None = None,
) -> tuple[_Layer, list]:
    """One layer's struct and what it must keep alive. ``entries``: every routed expert's
    ``cuda_ext.cpu._expert_entry`` (type, I, H, gate, up, down, biases), in expert order (None with
    ``route=ROUTE_NONE``, a dense layer). ``mla``: ``attn_plan`` is a ``cuda_ext.mla`` plan.
    ``topk_first``: gpt-oss's router; ``clamped=(alpha, limit)``: gpt-oss's experts; ``v3=(correction
    bias float32 [E] or None, n_group, topk_group, routed scale)``: DeepSeek-V3's router; ``shared``: the
    bf16 entry of a shared expert (or of a dense layer's MLP)."""
    entries = entries or []
    E = len(entries)
    table = (ctypes.c_void_p * max(1, 6 * E))(*(e[m] for m in range(3, 9) for e in entries))
    corr, n_group, topk_group, scale = v3 if v3 is not None else (None, 0, 0, 1.0)
    struct = _Layer(
        attn_plan.address,
        in_norm.data_ptr(),
        post_norm.data_ptr(),
        eps,
        top_k,
        int(renormalize),
        int(bf16_weights),
        entries[0][0] if entries else 0,
        E,
        entries[0][1] if entries else 0,
        _ptr(router),
        _ptr(router_bias),
        ctypes.addressof(table),
        int(norm_f32w),
        route,
        int(topk_first),
        0 if clamped is None else 1,
        0.0 if clamped is None else clamped[0],
        0.0 if clamped is None else clamped[1],
        int(mla),
        n_group,
        topk_group,
        scale,
        _ptr(corr),
        (ctypes.c_void_p * 6)(*(shared[3:9] if shared is not None else [None] * 6)),
        0 if shared is None else shared[1],
    )
    return struct, [attn_plan, in_norm, post_norm, router, router_bias, table, corr]


def decode_layers(
    layers: Layers, x: torch.Tensor, cos, sin, slot: int, pos: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(hidden [1, H] bf16, ids [sum k] int64, weights [sum k] float32, router inputs [layers, H] bf16,
    layers done): the hidden state after the layers done (all of them, unless a kernel refused one: the
    caller runs the rest one by one from there), the routing of those done and their router inputs.
    ``LayersF32``: x and the router inputs float32, each layer's int8 bits (``int8``, its experts';
    ``attn_int8``, its attention's) set for the current mode first."""
    lib = loader.cpu()
    if lib is None:
        return x, torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0), 0
    f32 = isinstance(layers, LayersF32)
    out = x.contiguous().clone()
    ids = torch.empty(layers.total_k, dtype=torch.int64)
    weights = torch.empty(layers.total_k, dtype=torch.float32)
    routed_in = torch.empty(layers.count, layers.hidden, dtype=torch.float32 if f32 else torch.bfloat16)
    err = (lib.lib.moeinf_decode_layers_f32 if f32 else lib.lib.moeinf_decode_layers)(
        layers.array,
        layers.count,
        layers.hidden,
        out.data_ptr(),
        None if cos is None else cos.data_ptr(),
        None if sin is None else sin.data_ptr(),
        slot,
        pos,
        ids.data_ptr(),
        weights.data_ptr(),
        routed_in.data_ptr(),
        threads,
    )
    done = layers.count if err == 0 else -err - 1
    return out, ids, weights, routed_in, done


# ---------------------------------------------------------------- one float32 token (a GGUF model's)


class _LayerF32(ctypes.Structure):
    _fields_ = [
        *_HEAD,
        ("type", ctypes.c_int),
        ("int8", ctypes.c_int),
        ("attn_int8", ctypes.c_int),
        ("E", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("router", ctypes.c_void_p),
        ("router_bias", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
    ]


class LayersF32(Layers):
    """``Layers`` of a float32 model; ``fmts[i]``: layer i's experts' (gate) format, for its int8 bit."""

    def __init__(self, structs: list[_LayerF32], keep: list, hidden: int, fmts: list[str | None]):
        super().__init__(structs, keep, hidden)
        self.fmts = fmts

    @staticmethod
    def _routed(s: _LayerF32) -> int:
        return s.k if s.E else 0


def layer_struct_f32(
    attn_plan,
    in_norm: torch.Tensor,
    post_norm: torch.Tensor,
    eps: float,
    entries: list[tuple],
    router: torch.Tensor | None = None,
    router_bias: torch.Tensor | None = None,
    top_k: int = 0,
    renormalize: bool = False,
) -> tuple[_LayerF32, list]:
    """One float32 layer's struct and what it must keep alive: ``attn_plan`` a ``cuda_ext.attention_f32``
    plan, float32 norms, ``entries`` every routed expert's float32 ``cuda_ext.cpu._expert_entry`` in expert
    order with a float32 ``router`` [E, H], or (no router) one entry: a dense layer's MLP."""
    E = len(entries) if router is not None else 0
    table = (ctypes.c_void_p * (6 * len(entries)))(*(e[m] for m in range(3, 9) for e in entries))
    struct = _LayerF32(
        attn_plan.address,
        in_norm.data_ptr(),
        post_norm.data_ptr(),
        eps,
        top_k if E else 1,
        int(renormalize),
        entries[0][0],
        0,
        0,
        E,
        entries[0][1],
        _ptr(router),
        _ptr(router_bias),
        ctypes.addressof(table),
    )
    return struct, [attn_plan, in_norm, post_norm, router, router_bias, table]
