"""``load_model``: build a store model's ``CausalLM`` and load its dense weights.

Reads ``config.json``, picks the family by ``model_type`` (``engine.store.families``), builds the
module tree on the meta device, assigns every tensor of ``dense/*.safetensors`` by name (converted
to ``dtype`` on ``device``), ties the LM head to the embedding when the config says so, and
allocates the KV caches. Routed experts come from ``experts`` (``MappedExperts`` by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import MoeinfError
from engine.model.args import ModelArgs
from engine.model.experts import ExpertSource, MappedExperts
from engine.model.transformer import CausalLM
from engine.store.families import Family, get_family


def read_config(model_root: Path) -> dict:
    path = Path(model_root) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeinfError(f"{path} is missing; pull the model again with `moeinf pull`") from None
    except json.JSONDecodeError as e:
        raise MoeinfError(f"{path} is not valid JSON ({e}); pull the model again with `moeinf pull`") from None


def _read_dense(
    model_root: Path, family: Family, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    files = sorted((Path(model_root) / "dense").glob("*.safetensors"))
    if not files:
        raise MoeinfError(f"no dense weights under {model_root}/dense; pull the model again with `moeinf pull`")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                name = family.rename(key)
                if name is None:
                    continue
                t = fh.get_tensor(key)
                target = torch.float32 if name.endswith(family.keep_fp32) and family.keep_fp32 else dtype
                if t.is_floating_point():
                    t = t.to(dtype=target)
                state[name] = t.to(device)
    return state


def load_model(
    model_root: Path | str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    experts: ExpertSource | None = None,
    max_seq_len: int = 4096,
) -> CausalLM:
    """The model of a store directory, ready for ``forward(tokens, start_pos)``."""
    model_root = Path(model_root)
    device = torch.device(device)
    config = read_config(model_root)
    model_type = config.get("model_type")
    if not model_type:
        raise MoeinfError(f"{model_root}/config.json has no model_type; pull the model again")
    family = get_family(str(model_type))
    args = ModelArgs.from_family(family, config)
    if experts is None:
        experts = MappedExperts(model_root, dtype, device)
    with torch.device("meta"):
        model = family.build(args, experts)
    state = _read_dense(model_root, family, dtype, device)
    expected = set(model.state_dict().keys())
    if "lm_head.weight" in expected and "lm_head.weight" not in state:
        if not args.tie_word_embeddings and "embed_tokens.weight" in state:
            raise MoeinfError(
                f"{model_root} has no lm_head.weight and its config does not tie embeddings; pull the model again"
            )
        state.pop("lm_head.weight", None)
        tie = True
    else:
        tie = False
    missing = sorted(expected - set(state) - ({"lm_head.weight"} if tie else set()))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise MoeinfError(
            f"dense weights of {model_root.name} do not match its {model_type} config ({what}); pull the model again"
        )
    shapes = model.state_dict()
    bad = [n for n, t in state.items() if tuple(t.shape) != tuple(shapes[n].shape)]
    if bad:
        n = bad[0]
        raise MoeinfError(
            f"dense tensor {n} of {model_root.name} has shape {tuple(state[n].shape)}, its config implies "
            f"{tuple(shapes[n].shape)}; pull the model again"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tie:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    model.eval()
    model.setup_caches(max_seq_len, dtype, device)
    return model
