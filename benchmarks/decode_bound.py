"""Decode speed against the memory-bandwidth bound on synthetic MoE shapes, all resident, CPU, bf16
activations; the routed experts in bf16 or (``--format``) a block format.

For each ``--synthetic`` shape (random weights written straight into the store, as ``moeinf bench
--synthetic`` does) the model is loaded, every expert touched once (all resident), and greedy decode
timed over ``--tokens`` steps, ``--runs`` times. The bound: the bytes one decode step must read (every
dense weight but the embedding table, which gives one row, plus top-k experts in each MoE layer) over
the read bandwidth the kernels' thread pool reaches on a 1 GiB buffer in the same run, with the same
thread count (``cuda_ext.cpu.read_bandwidth``), measured between the decode runs: the median bandwidth's
bound against the median time, and (run by run) each run's time against the bandwidth measured at the
start of that run, whose median and spread say more where the machine's rate moves from run to run.
Each timed run starts after the prompt and one untimed step (the native step describes the model's
layers on its first step, once per model: that took 1-2.5 ms/token of 16 steps on the many-expert
shapes when it was timed).

Three ways of running a step are interleaved: ``native step`` (the default path: every layer in one
native call, ``engine.model.native_step``, where the model takes it; else the same as ``grouped``),
``grouped`` (the layers one by one, all of a token's experts in one native call) and ``per-expert``
(the layers one by one, one native call per expert). The line under the shape says whether the native
step applied.

``--format q4_0`` (or any block format ``engine.formats`` knows: q4_1, q4_k, q6_k, q8_0, mxfp4) packs
every routed expert's matrices into that format after loading, as a pull with ``--quantize`` would
store them; the dense weights stay bf16. The weights are random, so (as ``predict_table.py`` does) only
the first few matrices of each shape are quantised and every other expert gets its own copy of one of
those blocks: its bytes, layout and kernels are a quantised model's, in a second instead of an hour.
A format whose block does not divide a matrix's rows (q4_k and q6_k need rows of 256) is refused.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_bound.py --synthetic qwen3-30b-a3b --scale 0.25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _weight_bytes(t) -> int:
    return t.raw.numel() if hasattr(t, "raw") else t.numel() * t.element_size()


def _step_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads, of which experts): dense weights but the embedding, plus k experts per MoE layer."""
    dense = sum(_weight_bytes(p) for name, p in model.state_dict().items() if "embed_tokens" not in name)
    if model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr():  # tied: the head reads it all
        dense += _weight_bytes(model.lm_head.weight)
    experts = 0
    for layer in model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        _, w = next(iter(mlp.experts.fetch(mlp.layer_idx, [0])))
        one = sum(_weight_bytes(t) for t in vars(w).values() if t is not None)
        experts += mlp.gate.top_k * one
    return dense + experts, experts


def _touch_experts(model) -> None:
    """Fetch and read every expert once, so the timed runs find them all resident."""
    for layer in model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            n = mlp.gate.weight.shape[0]
            for _, w in mlp.experts.fetch(mlp.layer_idx, list(range(n))):
                for t in vars(w).values():
                    if isinstance(t, torch.Tensor):
                        t.float().sum()


def _quantise_experts(model, name: str, variants: int = 4) -> None:
    """Every routed expert's gate, up and down packed into format ``name`` (in place, on the source's
    cached weights); each expert its own copy of one of the first ``variants`` packings of its shape."""
    from engine import formats
    from engine.formats.tensor import QuantTensor

    fmt = formats.get(name)
    if not fmt.quantised:
        raise SystemExit(f"--format {name}: not a block format")
    made: dict[tuple[int, ...], list[QuantTensor]] = {}
    count: dict[tuple[int, ...], int] = {}
    for layer in model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        n = mlp.gate.weight.shape[0]
        for _, w in mlp.experts.fetch(mlp.layer_idx, list(range(n))):
            for attr in ("gate", "up", "down"):
                t = getattr(w, attr)
                if t.shape[-1] % fmt.block:
                    raise SystemExit(f"--format {name}: rows of {t.shape[-1]} are not whole blocks of {fmt.block}")
                key = tuple(t.shape)
                have = made.setdefault(key, [])
                count[key] = count.get(key, 0) + 1
                if len(have) < variants:
                    have.append(QuantTensor.quantise(t.float(), fmt))
                    q = have[-1]
                else:
                    q = have[count[key] % variants].clone()
                setattr(w, attr, q)
    model._step = False  # described again, with the new tensors


def _per_expert(model) -> dict:
    """Swap each MoE block's grouped ``accumulate`` for one native call per expert; returns the originals."""
    from cuda_ext.cpu import swiglu_accumulate

    saved = {}
    for layer in model.layers:
        fn = getattr(layer.mlp, "expert_fn", None)
        if getattr(fn, "accumulate", None) is not None and id(fn) not in saved:  # layers may share one
            saved[id(fn)] = (fn, fn.accumulate)
            fn.accumulate = lambda x, ws, cs, acc: all(
                swiglu_accumulate(x, w, c, acc) for w, c in zip(ws, cs, strict=True)
            )
    return saved


def _decode(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per greedy decode step over ``tokens`` steps after the prompt and one untimed step (where
    the native step describes the model's layers, once per model: seconds on the many-expert shapes)."""
    nxt = model(prompt, 0, last_only=True)[-1].argmax().view(1)
    nxt = model(nxt, len(prompt))[-1].argmax().view(1)
    t0 = time.perf_counter()
    for pos in range(len(prompt) + 1, len(prompt) + 1 + tokens):
        nxt = model(nxt, pos)[-1].argmax().view(1)
    return (time.perf_counter() - t0) / tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", default="qwen3-30b-a3b", help="comma-separated synthetic shapes")
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--format", default="bf16", help="the routed experts' format: bf16, or a block format (q4_0, ...)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the synthetic models here (default: a temp dir)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="moeinf-bound-") as tmp:
        work = args.workdir or Path(tmp)
        os.environ["MOEINF_HOME"] = str(work / "home")
        from cuda_ext import cpu, loader
        from engine.bench.synthetic import make_synthetic_from_shape, synthetic_shape
        from engine.model.loader import load_model

        print(loader.describe())
        buffer = torch.ones(1 << 30, dtype=torch.uint8)
        for name in args.synthetic.split(","):
            shape = synthetic_shape(name, args.scale)
            store = make_synthetic_from_shape(f"{name}-{args.scale}", shape)
            model = load_model(store, dtype=torch.bfloat16, max_seq_len=args.prompt_len + args.tokens + 8)
            _touch_experts(model)
            if args.format != "bf16":
                _quantise_experts(model, args.format)
            step_bytes, expert_bytes = _step_bytes(model)
            prompt = torch.randint(
                3, shape.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)
            )
            times: dict[str, list[float]] = {"native step": [], "grouped": [], "per-expert": []}
            bandwidth: list[float] = []
            native = False
            with torch.inference_mode():
                for run in range(args.runs + 1):  # run 0 warms up
                    with cpu.decode_threads(True):
                        bw = cpu.read_bandwidth(buffer, args.threads, repeats=1)
                    model.native_step = False  # the layers one by one
                    saved = _per_expert(model)
                    t_per = _decode(model, prompt, args.tokens)
                    for fn, acc in saved.values():
                        fn.accumulate = acc
                    t_grouped = _decode(model, prompt, args.tokens)
                    model.native_step, model._step = True, False  # made again for the restored experts
                    t_native = _decode(model, prompt, args.tokens)
                    native = model._step is not None and model._step is not False
                    if run:
                        bandwidth.append(bw)
                        times["per-expert"].append(t_per)
                        times["grouped"].append(t_grouped)
                        times["native step"].append(t_native)
            bw = statistics.median(bandwidth)
            bound = step_bytes / bw
            print(
                f"{name} at scale {args.scale}, experts {args.format}: {shape.num_layers} layers, {shape.num_experts} experts, top-{shape.top_k}, "
                f"hidden {shape.hidden}, expert intermediate {shape.intermediate}, vocab {shape.vocab}; "
                f"{step_bytes / 1e6:.0f} MB per step ({expert_bytes / 1e6:.0f} MB experts); read bandwidth "
                f"{bw / 1e9:.1f} GB/s (min {min(bandwidth) / 1e9:.1f}, max {max(bandwidth) / 1e9:.1f}), "
                f"{args.threads} threads: bound {bound * 1e3:.1f} ms/token ({1 / bound:.1f} tok/s)"
            )
            print(f"  the native step over every layer {'applied' if native else 'did NOT apply'}")
            for mode, ts in times.items():
                t = statistics.median(ts)
                # each run against the bandwidth measured at its start (the shared machine's rate moves)
                per_run = [step_bytes / b / x for b, x in zip(bandwidth, ts, strict=True)]
                print(
                    f"  {mode:10s} {t * 1e3:7.1f} ms/token (runs {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}), "
                    f"{1 / t:5.1f} tok/s, {bound / t:4.0%} of the bound (run by run: median "
                    f"{statistics.median(per_run):.0%}, {min(per_run):.0%}-{max(per_run):.0%})"
                )
            del model
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
