"""``load_model``: build a store model's ``CausalLM`` and load its dense weights.

Takes the opened model (``engine.store.opened.StoreModel``, or a store directory to open), picks the
family by ``model_type`` (``engine.store.families``), builds the module tree on the meta device,
assigns every dense tensor by name (converted to ``dtype`` on ``device``), ties the LM head to the
embedding when the config says so, and allocates the KV caches. A block-quantised dense weight
(``engine.formats``) of a linear layer stays as stored and the layer computes on it; one of any other
module (embeddings, MLA's ``kv_b_proj``, whose heads are read as views) is dequantised to ``dtype`` at
load. A tied LM head over a block-quantised embedding computes on the stored blocks when the model
runs in float32 on the CPU with the native kernels (the float32 kernels multiply the same dequantised values, so only the order
of the sums changes, and a Q8_0 head reads a quarter of the float32 bytes per token); the embedding
lookup uses the dequantised table. Routed experts come from ``experts`` (``MappedExperts`` by default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from cuda_ext import loader as cuda_ext_loader
from cuda_ext.cpu import Linear
from engine.errors import MoeinfError
from engine.formats import storage
from engine.formats.linear import check_activations
from engine.formats.tensor import QuantTensor
from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource, MappedExperts
from engine.model.transformer import CausalLM
from engine.store.families import Family, get_family
from engine.store.opened import StoreModel, as_store_model

_FLOAT_ONLY = ("kv_b_proj.weight",)  # read as per-head views, not through a linear


def _read_dense(
    store: StoreModel, family: Family, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor | QuantTensor]:
    state: dict[str, torch.Tensor | QuantTensor] = {}
    for f in store.dense_files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            kept = storage.read_formats(fh.metadata())
            for key in fh.keys():
                name = family.rename(key)
                if name is None:
                    continue
                t = storage.as_stored(key, fh.get_tensor(key), kept)
                if isinstance(t, QuantTensor):
                    state[name] = t.to(device)
                    continue
                target = torch.float32 if name.endswith(family.keep_fp32) and family.keep_fp32 else dtype
                if t.is_floating_point():
                    t = t.to(dtype=target)
                state[name] = t.to(device)
    return state


def _place_quantised(
    model: CausalLM, state: dict[str, torch.Tensor | QuantTensor], dtype: torch.dtype
) -> dict[str, QuantTensor]:
    """Take the quantised weights of linear layers out of ``state`` (returned, to stay quantised);
    dequantise every other quantised tensor in ``state`` to ``dtype``."""
    kept: dict[str, QuantTensor] = {}
    for name, t in list(state.items()):
        if not isinstance(t, QuantTensor):
            continue
        module_name, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if isinstance(module, Linear) and leaf == "weight" and not name.endswith(_FLOAT_ONLY):
            kept[name] = state.pop(name)
        else:
            state[name] = t.dequantize(dtype)
    return kept


_FLOAT_FORMATS = frozenset({"f32", "f16", "bf16", "float32", "float16", "bfloat16"})


def _has_block_weights(store: StoreModel, quantised: dict) -> bool:
    """Whether the model keeps any weight in a block format (dense tensors placed as blocks, or experts)."""
    if quantised:
        return True
    formats = (store.manifest.get("formats") or {}).get("experts") or {}
    return any(str(f) not in _FLOAT_FORMATS for f in formats.values())


def load_model(
    store: StoreModel | Path | str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    experts: ExpertSource | None = None,
    max_seq_len: int = 4096,
    activations: str = "auto",
) -> CausalLM:
    """The model of an opened store model (or a store directory), ready for ``forward(tokens, start_pos)``.

    activations: how float32 activations meet block-format weights (``engine.formats.linear.ACTIVATIONS``):
    "auto" int8 per block on prompts (multi-token forwards), float32 on one-token decode; "float32"
    never rounded; "int8" always. Nothing changes for other dtypes or float weights."""
    try:
        activations = check_activations(activations)
    except ValueError as e:
        raise MoeinfError(str(e)) from None
    store = as_store_model(store)
    model_root = store.root
    device = torch.device(device)
    model_type = store.model_type
    if not model_type:
        raise MoeinfError(f"{model_root}/config.json has no model_type; pull the model again")
    family = get_family(model_type)
    args = ModelArgs.from_family(family, store.config)
    if experts is None:
        experts = MappedExperts(store, dtype, device)
    with torch.device("meta"):
        model = family.build(args, experts)
    state = _read_dense(store, family, dtype, device)
    stored_embedding = state.get("embed_tokens.weight")
    quantised = _place_quantised(model, state, dtype)
    expected = set(model.state_dict().keys()) | set(quantised)
    if "lm_head.weight" in expected and "lm_head.weight" not in state and "lm_head.weight" not in quantised:
        if not args.tie_word_embeddings and "embed_tokens.weight" in state:
            raise MoeinfError(
                f"{model_root} has no lm_head.weight and its config does not tie embeddings; pull the model again"
            )
        state.pop("lm_head.weight", None)
        tie = True
    else:
        tie = False
    missing = sorted(expected - set(state) - set(quantised) - ({"lm_head.weight"} if tie else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MoeinfError(
            f"dense weights of {model_root.name} do not match its {model_type} config ({what}); pull the model again"
        )
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    shapes.update({n: q.shape for n, q in quantised.items()})
    got = {**{n: tuple(t.shape) for n, t in state.items()}, **{n: q.shape for n, q in quantised.items()}}
    bad = [n for n, shape in got.items() if shape != shapes[n]]
    if bad:
        n = bad[0]
        raise MoeinfError(
            f"dense tensor {n} of {model_root.name} has shape {got[n]}, its config implies "
            f"{shapes[n]}; pull the model again"
        )
    model.load_state_dict(state, strict=False, assign=True)
    for n, q in quantised.items():
        module = model.get_submodule(n.rsplit(".", 1)[0])
        del module.weight  # the parameter goes; the layer computes on the stored blocks
        module.weight = q
    if (
        tie
        and isinstance(stored_embedding, QuantTensor)
        and dtype == torch.float32
        and device.type == "cpu"
        and cuda_ext_loader.cpu() is not None  # the PyTorch path would dequantise the head every token
    ):
        del model.lm_head.weight
        model.lm_head.weight = stored_embedding
    elif tie:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.eval()
    # the mode matters only where float32 activations meet block-format weights: elsewhere (bf16, float
    # weights) it is "float32", and every forward runs as it did
    model.activations = activations if dtype == torch.float32 and _has_block_weights(store, quantised) else "float32"
    model.setup_caches(max_seq_len, dtype, device)
    return model
