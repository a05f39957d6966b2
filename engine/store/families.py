"""Model families: what every part of moeinf knows about a ``model_type``, asked through one registry.

A family is one module (a package for the big ones) under ``engine/model/families/`` that defines
``FAMILY = Family(...)`` (or ``FAMILIES = (...)``): its config defaults and MoE layout, its
checkpoint names (the MoE block's module, expert projections, fused 3-D expert tensors and how to
split them, renames, tensors kept in float32, the router), how to read it from a GGUF file, what a
random model of its shape needs, and ``build``, which makes the ``CausalLM``. The store, the
converter, the GGUF reader, the loader, the speculative-gating hints and the synthetic models ask
``get_family(model_type)`` / ``moe_layout(config)`` here instead of branching on names, so adding a
family touches that one module (and its test). An unregistered ``model_type`` is refused with the
list of supported ones.

Why the descriptor types and the registry live in ``store/`` while the families live in ``model/``:
the store needs the descriptors (a pull converts a checkpoint by its family's names), and imports
run CLI -> runtime -> model -> store, never upwards. So this module, at the store's layer, defines
the types and finds the family modules by package name (``importlib``; no import statement points
up), and the family modules import these types. A family module imports only this module at its
top and its layers inside ``build``, so asking a family for its names loads no model code.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import MoeinfError

FAMILY_PACKAGE = "engine.model.families"

# What one expert shard holds (nn.Linear layout): gate [I, H], up [I, H], down [H, I], and for
# families with expert biases gate [I], up [I], down [H].
EXPERT_TENSORS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
EXPERT_BIASES = ("gate_proj.bias", "up_proj.bias", "down_proj.bias")


def expert_tensor_shapes(hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor an expert shard may hold."""
    return {
        "gate_proj.weight": (inter, hidden),
        "up_proj.weight": (inter, hidden),
        "down_proj.weight": (hidden, inter),
        "gate_proj.bias": (inter,),
        "up_proj.bias": (inter,),
        "down_proj.bias": (hidden,),
    }


GATE_UP_DOWN = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k")


@dataclass(frozen=True)
class MoELayout:
    """Where a model's routed experts are. For a dense model num_experts == 0 and moe_layers == []."""

    family: str
    num_layers: int
    num_experts: int
    top_k: int
    moe_layers: list[int] = field(default_factory=list)
    hidden_size: int = 0
    expert_intermediate_size: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and bool(self.moe_layers)


def config_int(config: Mapping[str, Any], key: str) -> int:
    """``config[key]`` as a whole number; a missing or malformed value is a one-line MoeinfError."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        what = "is missing" if value is None else f"is {value!r}, not a whole number"
        raise MoeinfError(
            f"config.json: {key} {what}; the checkpoint's config is damaged, re-download or fix it"
        )
    return int(value)


def first_key(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The value of the first of ``names`` that ``config`` sets (not None)."""
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def every_layer(config: Mapping[str, Any], num_layers: int) -> list[int]:
    return list(range(num_layers))


def strip_model_prefix(name: str) -> str | None:
    """The default tensor-name map: transformers' ``model.layers.0...`` -> ``layers.0...``."""
    return name[len("model.") :] if name.startswith("model.") else name


FusedPieces = Iterator[tuple[int, str, Any]]


def split_fused_halves(which: str, bias: bool, t: Any, inter: int) -> FusedPieces:
    """transformers' fused experts: ``gate_up_proj`` [E, 2I, H] (gate rows then up rows), ``down_proj``
    [E, H, I] -> (expert, store tensor name, tensor) for every expert."""
    for e in range(t.shape[0]):
        x = t[e]
        if which == "gate_up_proj":
            yield e, "gate_proj.weight", x[:inter].clone()
            yield e, "up_proj.weight", x[inter:].clone()
        else:
            yield e, "down_proj.weight", x.clone()


@dataclass(frozen=True)
class GGUFArch:
    """How a family is read from a GGUF file (``engine/store/gguf.py`` does what all share).

    ``config(get, tensor_names)``: the family's config.json keys from the file's metadata
    (``get(key, default)`` reads ``<architecture>.<key>``); ``block_names``: block tensors beyond the
    common attention / norm / dense-MLP ones (``blk.N.<part>`` -> module under ``model.layers.N.``);
    ``row_vectors``: parts GGUF stores as a vector that the checkpoint holds as one row [1, n];
    ``unpermute_qk``: undo llama.cpp's Q/K row permutation (its ``llama`` architecture does it).
    """

    architecture: str
    config: Callable[[Callable[[str, Any], Any], set[str]], dict[str, Any]]
    block_names: Mapping[str, str] = field(default_factory=dict)
    row_vectors: tuple[str, ...] = ()
    unpermute_qk: bool = False


def no_tensors(shape: Any) -> list[tuple[str, tuple[int, ...]]]:
    return []


@dataclass(frozen=True)
class SyntheticRecipe:
    """What a random-weight model of this family needs (``engine/bench/synthetic.py``).

    ``config(shape)``: the family's config.json keys for a ``SyntheticShape``; ``layer_tensors(shape)``:
    per-layer dense tensors beyond the attention projections, the two norms and the router, as
    (name under ``model.layers.N.``, shape); ``attention_tensors(shape)``: the attention's tensors when
    they are not q/k/v/o projections (DeepSeek's latent attention); ``presets``: shapes of real
    checkpoints, name -> (layers, experts, top_k, hidden, expert intermediate, vocab, heads, kv_heads[,
    head_dim]).
    """

    config: Callable[[Any], dict[str, Any]]
    layer_tensors: Callable[[Any], list[tuple[str, tuple[int, ...]]]] = no_tensors
    presets: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    attention_tensors: Callable[[Any], list[tuple[str, tuple[int, ...]]]] | None = None


@dataclass(frozen=True)
class Family:
    """Everything moeinf knows about one ``model_type`` (see the module docstring).

    config.json: ``config_defaults`` (values for keys a config may omit, as its transformers config
    class has them), ``rope_theta`` (when it names none), ``default_rope`` (rope parameters when it
    gives none at all).
    Layout: ``expert_count`` (keys naming the number of routed experts, first set wins; empty for a
    dense family), ``expert_size`` (keys of one expert's intermediate size), ``sparse_layers(config,
    num_layers)`` (which decoder layers have routed experts).
    Checkpoint names: ``moe_module`` (the MoE block's module in hub checkpoints; the store calls it
    ``mlp``), ``projections`` (per-expert projection name -> store name), ``expert_tensors`` (what an
    expert shard holds), ``split_fused(which, bias, tensor, intermediate)`` (a fused 3-D
    ``experts.gate_up_proj`` / ``experts.down_proj`` (``_bias``) tensor -> per-expert pieces),
    ``router`` (the router's module under ``mlp``), ``rename(store name) -> parameter name`` (None
    drops it), ``keep_fp32`` (name suffixes kept in float32 by the converter and the loader),
    ``fuse_experts(shards) -> {name under experts.: tensor}`` (for families whose hub checkpoints hold
    the experts fused: one layer's fused tensors from its expert shards, the inverse of
    ``split_fused``; None: hub checkpoints name each expert, as ``export`` then writes them).
    ``build(args, experts) -> CausalLM`` imports the family's layers when called.
    """

    model_type: str
    build: Callable[[Any, Any], Any]
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    rope_theta: float = 10000.0
    default_rope: Mapping[str, Any] | None = None
    expert_count: tuple[str, ...] = ()
    expert_size: tuple[str, ...] = ("intermediate_size",)
    sparse_layers: Callable[[Mapping[str, Any], int], list[int]] = every_layer
    moe_module: str = "mlp"
    projections: Mapping[str, str] = field(default_factory=lambda: dict(GATE_UP_DOWN))
    expert_tensors: tuple[str, ...] = EXPERT_TENSORS
    split_fused: Callable[[str, bool, Any, int], FusedPieces] = split_fused_halves
    router: str = "gate"
    rename: Callable[[str], str | None] = strip_model_prefix
    keep_fp32: tuple[str, ...] = ()
    fuse_experts: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    gguf: GGUFArch | None = None
    synthetic: SyntheticRecipe | None = None

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_count)

    def router_weight(self, layer: int) -> str:
        """The store's (dense shard) name of MoE layer ``layer``'s router matrix [E, H]."""
        return f"model.layers.{layer}.mlp.{self.router}.weight"

    def moe_layout(self, config: Mapping[str, Any]) -> MoELayout:
        """The MoE layout of a Hugging Face config dict of this family."""
        n_layers = config_int(config, "num_hidden_layers")
        hidden = config_int(config, "hidden_size")
        if not self.is_moe:
            return MoELayout(self.model_type, n_layers, 0, 0, [], hidden, 0)
        top_k = int(first_key(config, *TOP_K_KEYS, default=0))
        n_exp = first_key(config, *self.expert_count)
        inter = first_key(config, *self.expert_size)
        if not n_exp or not top_k or inter is None:
            raise MoeinfError(
                f"config.json of this {self.model_type} model names no experts, no top-k or no expert size; "
                "the checkpoint is incomplete"
            )
        moe = self.sparse_layers(config, n_layers)
        return MoELayout(self.model_type, n_layers, int(n_exp), top_k, moe, hidden, int(inter))


_REGISTERED: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> Family:
    """Add a family defined outside ``engine/model/families`` (a plugin, a test)."""
    if _REGISTERED.get(family.model_type, family) is not family:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    _REGISTERED[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    _REGISTERED.pop(model_type, None)


def _discover() -> None:
    """Register the ``FAMILY`` / ``FAMILIES`` of every module of ``engine/model/families`` (once)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(FAMILY_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{FAMILY_PACKAGE}.{info.name}")
        found = getattr(module, "FAMILIES", ()) or (getattr(module, "FAMILY", None),)
        for family in found:
            if family is not None:
                register(family)
    _discovered = True


def families() -> list[Family]:
    """Every registered family, by model_type."""
    _discover()
    return [_REGISTERED[k] for k in sorted(_REGISTERED)]


def supported_model_types() -> list[str]:
    return [f.model_type for f in families()]


def get_family(model_type: str | None) -> Family:
    """The family of ``model_type``; a MoeinfError listing the supported ones if none is registered."""
    _discover()
    family = _REGISTERED.get(str(model_type))
    if family is None:
        raise MoeinfError(
            f"unsupported model family {model_type!r}; moeinf supports {', '.join(supported_model_types())}"
        )
    return family


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a config.json dict (by its ``model_type``)."""
    return get_family(config.get("model_type"))


def moe_layout(config: Mapping[str, Any]) -> MoELayout:
    """The MoE layout of a Hugging Face config dict (old hub field names and transformers 5's both work)."""
    return family_of(config).moe_layout(config)


def gguf_family(architecture: str | None, has_experts: bool) -> Family:
    """The family a GGUF file of ``architecture`` converts to (with or without routed experts)."""
    for family in families():
        if family.gguf and family.gguf.architecture == architecture and family.is_moe == has_experts:
            return family
    supported = sorted({f.gguf.architecture for f in families() if f.gguf})
    raise MoeinfError(
        f"GGUF architecture {architecture!r} is not supported (supported: {', '.join(supported)}); "
        "pull the model's Hugging Face repository instead"
    )
