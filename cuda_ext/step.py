"""The decoder layers of one bf16 decode token in one native call (``csrc/cpu/step.c``).

``layer_struct(...)`` describes one pre-norm MoE layer (its attention's ``cuda_ext.attention`` plan, the
two RMSNorms, the softmax top-k router and a pointer table of every routed expert of the layer);
``decode_layers(layers, x, cos, sin, slot, pos, threads)`` runs them all for one token and returns the
hidden state and every layer's routing (ids and weights, for the expert source's hooks). The kernel calls
the same native pieces the layers call one by one, so the result is the same bits.
"""

from __future__ import annotations

import ctypes

import torch

from cuda_ext import loader


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn", ctypes.c_void_p),
        ("in_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("k", ctypes.c_int),
        ("renorm", ctypes.c_int),
        ("bf16_weights", ctypes.c_int),
        ("type", ctypes.c_int),
        ("E", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("router", ctypes.c_void_p),
        ("router_bias", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
    ]


class Layers:
    """The structs of a model's layers, kept with everything they point into."""

    def __init__(self, structs: list[_Layer], keep: list, hidden: int):
        self.array = (_Layer * len(structs))(*structs)
        self.keep = keep
        self.hidden = hidden
        self.count = len(structs)
        self.topk = [s.k for s in structs]
        self.total_k = sum(self.topk)


def layer_struct(
    attn_plan,
    in_norm: torch.Tensor,
    post_norm: torch.Tensor,
    eps: float,
    router: torch.Tensor,
    router_bias: torch.Tensor | None,
    top_k: int,
    renormalize: bool,
    bf16_weights: bool,
    entries: list[tuple],
) -> tuple[_Layer, list]:
    """One layer's struct and what it must keep alive. ``entries``: every expert's
    ``cuda_ext.cpu._expert_entry`` (type, I, H, gate, up, down, biases), in expert order."""
    E = len(entries)
    table = (ctypes.c_void_p * (6 * E))(*(e[m] for m in range(3, 9) for e in entries))
    struct = _Layer(
        attn_plan.address,
        in_norm.data_ptr(),
        post_norm.data_ptr(),
        eps,
        top_k,
        int(renormalize),
        int(bf16_weights),
        entries[0][0],
        E,
        entries[0][1],
        router.data_ptr(),
        None if router_bias is None else router_bias.data_ptr(),
        ctypes.addressof(table),
    )
    return struct, [attn_plan, in_norm, post_norm, router, router_bias, table]


def decode_layers(
    layers: Layers, x: torch.Tensor, cos, sin, slot: int, pos: int, threads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(hidden [1, H] bf16, ids [sum k] int64, weights [sum k] float32, layers done): the hidden state
    after the layers done (all of them, unless a kernel refused one: the caller runs the rest one by
    one from there) and the routing of those done."""
    lib = loader.cpu()
    if lib is None:
        return x, torch.empty(0, dtype=torch.int64), torch.empty(0), 0
    out = x.contiguous().clone()
    ids = torch.empty(layers.total_k, dtype=torch.int64)
    weights = torch.empty(layers.total_k, dtype=torch.float32)
    err = lib.lib.moeinf_decode_layers(
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
        threads,
    )
    done = layers.count if err == 0 else -err - 1
    return out, ids, weights, done
