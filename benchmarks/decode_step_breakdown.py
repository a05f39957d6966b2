"""Where one moeinf decode step goes: wall time per module kind, all resident, CPU, bf16, on the
Mixtral-shaped model of ``decode_vs_transformers.py`` (same defaults, same checkpoint maker) or on
any synthetic shape (``--synthetic qwen3-30b-a3b --scale 0.25``: the shapes of ``moeinf bench
--synthetic``, random weights written straight into the store).

Each module's ``forward`` is wrapped with a timer; a step is the model's forward for one token plus
the argmax. Printed: the median step (of ``--runs`` runs of ``--tokens`` steps after a warm-up run)
and its parts: norms, attention, MoE (and inside it: the router, the expert source's observe and
fetch, the experts' own compute; the rest of the MoE time is the block's Python between them), LM
head, and the rest (embedding, the layer loop, argmax), per step and per layer. The breakdown runs the
layers one by one (``model.native_step = False``); each run is followed by the same steps with the
native step over every layer (``engine.model.native_step``) where the model takes it, whose median is
printed beside (the modules' timers do not see inside it).

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_step_breakdown.py [--workdir DIR]
    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_step_breakdown.py --synthetic qwen3-30b-a3b --scale 0.25
    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_step_breakdown.py --store HOME/models/NAME --dtype float32

``--store DIR`` times a model already in a store (a pulled GGUF, say) in ``--dtype`` (default bf16);
``--prefill`` splits the prompt's forward (``--prompt-len`` tokens) the same way instead of a decode step.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from cuda_ext import step as native_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bound import _quantise_experts, _touch_experts  # noqa: E402
from decode_vs_transformers import add_model_args, make_checkpoint  # noqa: E402


def _timed(parts: dict[str, float], name: str, module: torch.nn.Module) -> None:
    forward = module.forward

    def run(*args, **kwargs):
        t = time.perf_counter()
        out = forward(*args, **kwargs)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    module.forward = run


def _timed_call(parts: dict[str, float], name: str, owner, attr: str) -> None:
    """Time every call of ``owner.attr`` (a method or a function attribute) under ``name`` (the wrapper's
    ``__wrapped__`` is the original: the native step still recognises the experts' ``accumulate``)."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    setattr(owner, attr, run)


def _timed_fetch(parts: dict[str, float], experts) -> None:
    """Time the expert source's ``fetch`` generator (the time to produce each expert, not the consumer's)."""
    fetch = experts.fetch

    def run(layer, ids):
        it = iter(fetch(layer, ids))
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                parts["  of which fetch"] = parts.get("  of which fetch", 0.0) + time.perf_counter() - t
                return
            parts["  of which fetch"] = parts.get("  of which fetch", 0.0) + time.perf_counter() - t
            yield item

    experts.fetch = run


def _store(args: argparse.Namespace, work: Path) -> Path:
    """The model to time: a synthetic shape's random weights, or the Mixtral-shaped checkpoint pulled."""
    if args.store is not None:
        import json

        cfg = json.loads((args.store / "config.json").read_text())
        args.layers, args.vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        return args.store
    if args.synthetic:
        from engine.bench.synthetic import make_synthetic_from_shape, synthetic_shape

        shape = synthetic_shape(args.synthetic, args.scale)
        args.layers, args.vocab = shape.num_layers, shape.vocab
        print(
            f"synthetic {args.synthetic} at scale {args.scale}: {shape.num_layers} layers, {shape.num_experts} "
            f"experts, top-{shape.top_k}, hidden {shape.hidden}, expert intermediate {shape.intermediate}, "
            f"vocab {shape.vocab}"
        )
        return make_synthetic_from_shape(f"{args.synthetic}-{args.scale}", shape)
    from engine.store.pull import pull_model

    return pull_model(str(make_checkpoint(work / "ckpt", args)), name="bench-mixtral").path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="steps per run")
    p.add_argument("--synthetic", default=None, help="a synthetic shape (moeinf bench --synthetic's names)")
    p.add_argument("--scale", type=float, default=0.25, help="width scale of --synthetic")
    p.add_argument("--store", type=Path, default=None, help="a model directory of a store (models/NAME)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 or float32")
    p.add_argument("--prefill", action="store_true", help="split the prompt's forward instead of a decode step")
    p.add_argument("--activations", default="auto", help="float32 models on block formats: auto, float32 or int8")
    p.add_argument("--format", default="bf16", help="the routed experts packed into a block format (q4_0, ...), as decode_bound.py")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="moeinf-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MOEINF_HOME"] = str(work / "home")
        from engine.model.loader import load_model

        store = _store(args, work)
        model = load_model(store, dtype=getattr(torch, args.dtype), max_seq_len=args.prompt_len + args.tokens + 8,
                           activations=args.activations)
        parts: dict[str, float] = {}
        _touch_experts(model)  # all resident: the native step is offered every expert
        if args.format != "bf16":
            _quantise_experts(model, args.format)
        sources, wrapped = [], []  # each expert source and expert function wrapped once (layers share them)
        for layer in model.layers:
            _timed(parts, "norms", layer.input_layernorm)
            _timed(parts, "norms", layer.post_attention_layernorm)
            _timed(parts, "attention", layer.self_attn)
            _timed(parts, "moe", layer.mlp)
            if hasattr(layer.mlp, "experts"):
                _timed(parts, "  of which router", layer.mlp.gate)
                if not any(src is layer.mlp.experts for src in sources):
                    sources.append(layer.mlp.experts)
                    _timed_call(parts, "  of which observe", layer.mlp.experts, "observe")
                    _timed_fetch(parts, layer.mlp.experts)
                fn = layer.mlp.expert_fn
                if args.prefill:  # the prompt's tokens go expert by expert through the expert function
                    if not any(f is layer.mlp for f in wrapped):
                        wrapped.append(layer.mlp)
                        _timed_call(parts, "  of which experts", layer.mlp, "expert_fn")
                elif getattr(fn, "accumulate", None) is not None and not any(f is fn for f in wrapped):
                    wrapped.append(fn)  # layers may share one expert function: wrapped once
                    _timed_call(parts, "  of which experts", fn, "accumulate")
        _timed(parts, "lm head", model.lm_head)
        prompt = torch.randint(3, args.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        runs, native_runs, native_parts = [], [], []
        for run in range(args.runs + 1):  # run 0 warms up; decode: layer by layer (timed per module), then native
            if args.prefill:
                parts.clear()
                t0 = time.perf_counter()
                model(prompt, 0, last_only=True)
                if run:
                    runs.append((time.perf_counter() - t0, dict(parts)))
                continue
            for native in (False, True):
                model.native_step = native  # the native step over every layer skips the modules' timers
                nxt = model(prompt, 0, last_only=True)[-1].argmax().view(1)
                parts.clear()
                with native_step.Profile() as prof:  # the native step's parts (read only when it ran)
                    t0 = time.perf_counter()
                    for pos in range(args.prompt_len, args.prompt_len + args.tokens):
                        nxt = model(nxt, pos)[-1].argmax().view(1)
                    dt = (time.perf_counter() - t0) / args.tokens
                if run and native:
                    native_runs.append(dt)
                    native_parts.append({k: v / args.tokens for k, v in prof.seconds.items()})
                elif run:
                    runs.append((dt, {k: v / args.tokens for k, v in parts.items()}))
        runs.sort(key=lambda r: r[0])
        step, split = runs[len(runs) // 2]
        if args.prefill:
            print(f"prefill of {args.prompt_len} tokens: {step * 1e3:.2f} ms ({args.prompt_len / step:.1f} tok/s), "
                  f"median of {args.runs} runs, {args.layers} layers, {args.threads} threads")
        else:
            taken = model._step is not None and model._step is not False
            native = sorted(native_runs)[len(native_runs) // 2]
            print(
                f"decode step: {step * 1e3:.2f} ms ({1 / step:.1f} tok/s) layer by layer, "
                + (f"{native * 1e3:.2f} ms ({1 / native:.1f} tok/s) with the native step over every layer"
                   if taken else "(the native step over every layer does not apply to this model)")
                + f"; medians of {args.runs} runs of {args.tokens} steps, {args.layers} layers, {args.threads} threads"
            )
        moe_inner = ("  of which router", "  of which observe", "  of which fetch", "  of which experts")
        glue = split.get("moe", 0.0) - sum(split.get(name, 0.0) for name in moe_inner)
        split["  of which glue"] = glue
        layers = len(model.layers)
        print(f"  {'':18s} {'ms/step':>8s} {'us/layer':>9s}")
        for name in ("norms", "attention", "moe", *moe_inner, "  of which glue", "lm head"):
            t = split.get(name, 0.0)
            print(f"  {name:18s} {t * 1e3:8.2f} {t * 1e6 / layers:9.1f}")
        rest = step - sum(t for name, t in split.items() if not name.startswith(" "))
        print(f"  {'rest':18s} {rest * 1e3:8.2f} {rest * 1e6 / layers:9.1f}  (embedding, layer loop, argmax)")
        print(
            "  (glue: the MoE block's own Python and torch ops between router, observe, fetch and the experts)"
        )
        if not args.prefill and taken:
            layers_s = [sum(p.values()) for p in native_parts]
            mid = native_parts[sorted(range(len(layers_s)), key=layers_s.__getitem__)[len(layers_s) // 2]]
            print("  the native step's layers (the run of median layer time; step.c's clock between parts):")
            for name, t in mid.items():
                print(f"  {name:18s} {t * 1e3:8.2f} {t * 1e6 / layers:9.1f}")
            outside = native - sum(mid.values())
            print(f"  {'outside the layers':18s} {outside * 1e3:8.2f}  (embedding, final norm, LM head, argmax, Python)")
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
