"""Sparse upcycling: a dense llama checkpoint -> a Mixtral checkpoint (Komatsuzaki et al., 2022).

``upcycle_checkpoint(src_dir, out_dir, num_experts, top_k, dtype)``: every expert of a layer is an
exact copy of that layer's FFN (w1 = gate_proj, w3 = up_proj, w2 = down_proj); attention, norms and
embeddings are copied (block-quantised tensors, e.g. a GGUF's Q4_1, as their raw blocks); each layer
gets a router whose rows are k-means centroids of the layer's FFN inputs on text the dense model
generated itself (``engine.upcycle.router``). Mixtral
renormalises the top-k routing weights to sum to one, so with identical experts the output is the
dense model's up to rounding, whichever experts the router picks -- the model is upcycled, not
trained. ``config.json`` records that under ``"moeinf_upcycled"``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.errors import MoeinfError
from engine.formats import storage
from engine.store.config import read_config
from engine.store.dtypes import config_dtype, parse_dtype
from engine.store.pull import PullProgress
from engine.store.shards import StreamingShardWriter, TensorSpec
from engine.upcycle.router import collect_ffn_inputs, router_weights

UPCYCLED_KEY = "moeinf_upcycled"
_FFN_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_NAME = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_DROP_KEYS = ("mlp_bias", "pretraining_tp", "architectures", "model_type", "auto_map")


def check_options(num_experts: int, top_k: int) -> None:
    """A one-line error for an expert count or top-k that cannot be upcycled."""
    if num_experts < 2:
        raise MoeinfError(f"--upcycle needs at least 2 experts, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise MoeinfError(f"--top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")


def _check(config: dict[str, Any], num_experts: int, top_k: int) -> None:
    check_options(num_experts, top_k)
    if config.get("model_type") != "llama":
        raise MoeinfError(
            f"--upcycle needs a dense llama-family model, not {config.get('model_type')!r}; "
            "pull it without --upcycle"
        )
    if config.get("mlp_bias") or config.get("attention_bias"):
        raise MoeinfError("--upcycle does not support llama models with attention or MLP biases (Mixtral has none)")


def mixtral_config(config: dict[str, Any], num_experts: int, top_k: int, dtype: torch.dtype,
                   record: dict[str, Any]) -> dict[str, Any]:
    """The Mixtral ``config.json`` of the upcycled model of a llama ``config``."""
    out = {k: v for k, v in config.items() if k not in _DROP_KEYS}
    out.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
        output_router_logits=False,
        sliding_window=None,
        dtype=str(dtype).removeprefix("torch."),
    )
    out.pop("torch_dtype", None)
    out[UPCYCLED_KEY] = record
    return out


def _source_tensors(src_dir: Path) -> list[tuple[Path, str]]:
    files = sorted(src_dir.glob("*.safetensors"))
    if not files:
        raise MoeinfError(f"{src_dir} has no *.safetensors weights to upcycle")
    out = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.extend((f, k) for k in fh.keys())
    return out


def _plan(src: list[tuple[Path, str]], num_experts: int, hidden: int, dtype: torch.dtype,
          kept: dict[str, tuple[str, tuple[int, ...]]] | None = None) -> list[tuple[TensorSpec, Path, str]]:
    """Every output tensor (spec, source file, source tensor name), in source order; the router of a
    layer comes right before its experts. A tensor in a block format (``kept``: source name ->
    (format, logical shape), from ``_source_formats``) is copied as its raw blocks; ``kept`` gains
    the output names of the copies."""
    kept = {} if kept is None else kept
    plan: list[tuple[TensorSpec, Path, str]] = []
    routed: set[int] = set()
    for path, name in src:
        with safe_open(str(path), framework="pt") as fh:
            shape = tuple(fh.get_slice(name).get_shape())
        entry = kept.get(name)
        out_dtype = torch.uint8 if entry else dtype
        m = _FFN_RE.match(name)
        if m is None:
            plan.append((TensorSpec(name, out_dtype, shape), path, name))
            continue
        layer, proj = int(m[1]), m[2]
        prefix = f"model.layers.{layer}.block_sparse_moe"
        if layer not in routed:
            routed.add(layer)
            plan.append((TensorSpec(f"{prefix}.gate.weight", dtype, (num_experts, hidden)), path, f"router:{layer}"))
        for e in range(num_experts):
            out = f"{prefix}.experts.{e}.{_EXPERT_NAME[proj]}.weight"
            plan.append((TensorSpec(out, out_dtype, shape), path, name))
            if entry:
                kept[out] = entry
    return plan


def _source_formats(src: list[tuple[Path, str]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Source tensor name -> (block format, logical shape) of every block-quantised source tensor."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted({p for p, _ in src}):
        with safe_open(str(path), framework="pt") as fh:
            out.update(storage.read_formats(fh.metadata()))
    return out


def upcycle_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: str | torch.dtype | None = None,
    *,
    max_new_tokens: int = 48,
    seed: int = 0,
    progress: PullProgress | None = None,
) -> Path:
    """Write the Mixtral checkpoint upcycled from the dense llama checkpoint ``src_dir`` to ``out_dir``.

    ``dtype`` None keeps the source's dtype. The directory is built aside and renamed into place.
    ``progress`` sees three tasks: the calibration text generated, the routers clustered, the bytes
    written.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = read_config(src_dir, hint="upcycling needs a Hugging Face checkpoint directory")
    _check(config, num_experts, top_k)
    torch_dtype = parse_dtype(dtype) or config_dtype(config) or torch.float32
    progress = progress or PullProgress()

    t0 = time.perf_counter()
    calib = collect_ffn_inputs(src_dir, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    advance = progress.task(f"routers from {calib.tokens} tokens (k-means)", len(calib.inputs), unit="layers")
    routers = []
    for i, x in enumerate(calib.inputs):
        routers.append(router_weights(x, num_experts, top_k, calib.lengths, seed=seed + i))
        advance(1)
    hidden = int(config["hidden_size"])
    record = {
        "method": "sparse upcycling (Komatsuzaki et al., 2022): experts are copies of the dense FFN",
        "trained": False,
        "source": config.get("moeinf_source") or {"path": src_dir.name},
        "source_model_type": "llama",
        "num_experts": num_experts,
        "top_k": top_k,
        "router": "spherical k-means centroids of FFN inputs on self-generated text, in their 16 slowest-changing "
                  "directions (centred, mean direction removed)",
        "calibration_tokens": calib.tokens,
        "calibration_prompts": calib.prompts,
        "router_margin": routers[0].median_margin if routers else None,
        "seed": seed,
    }

    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = _source_tensors(src_dir)
    kept = _source_formats(src)
    plan = _plan(src, num_experts, hidden, torch_dtype, kept)
    meta = {"format": "pt", **storage.metadata({spec.name: kept[spec.name] for spec, _, _ in plan if spec.name in kept})}
    advance = progress.task(f"writing {num_experts} experts per layer", sum(p[0].nbytes for p in plan))
    handles: dict[Path, Any] = {}
    try:
        with StreamingShardWriter(work / "model.safetensors", [p[0] for p in plan], metadata=meta) as w:
            cached: tuple[str, torch.Tensor] | None = None
            for spec, path, name in plan:
                if name.startswith("router:"):
                    w.write(spec.name, routers[int(name.split(":")[1])].weight.to(torch_dtype))
                else:
                    if cached is None or cached[0] != f"{path}:{name}":
                        fh = handles.get(path) or handles.setdefault(path, safe_open(str(path), framework="pt"))
                        t = fh.get_tensor(name)  # block-quantised: its raw blocks, copied as they are
                        cached = (f"{path}:{name}", t if name in kept else t.to(torch_dtype))
                    w.write(spec.name, cached[1])
                advance(spec.nbytes)
    finally:
        handles.clear()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, work / name)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    out_cfg = mixtral_config(config, num_experts, top_k, torch_dtype, record)
    tmp = work / "config.json.tmp"
    tmp.write_text(json.dumps(out_cfg, indent=2) + "\n")
    os.replace(tmp, work / "config.json")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir
