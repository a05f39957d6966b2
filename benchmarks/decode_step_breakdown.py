"""Where one moeinf decode step goes: wall time per module kind on the Mixtral-shaped model of
``decode_vs_transformers.py`` (same defaults, same checkpoint maker), all resident, CPU, bf16.

Each module's ``forward`` is wrapped with a timer; a step is the model's forward for one token plus
the argmax. Printed: the median step (of ``--runs`` runs of ``--tokens`` steps after a warm-up run)
and its parts: norms, attention, MoE (with its router), LM head, and the rest (embedding, the layer
loop, argmax).

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_step_breakdown.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_transformers import add_model_args, make_checkpoint  # noqa: E402


def _timed(parts: dict[str, float], name: str, module: torch.nn.Module) -> None:
    forward = module.forward

    def run(*args, **kwargs):
        t = time.perf_counter()
        out = forward(*args, **kwargs)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    module.forward = run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="steps per run")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="moeinf-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MOEINF_HOME"] = str(work / "home")
        from engine.model.loader import load_model
        from engine.store.pull import pull_model

        store = pull_model(str(make_checkpoint(work / "ckpt", args)), name="bench-mixtral").path
        model = load_model(store, dtype=torch.bfloat16, max_seq_len=args.prompt_len + args.tokens + 8)
        parts: dict[str, float] = {}
        for layer in model.layers:
            _timed(parts, "norms", layer.input_layernorm)
            _timed(parts, "norms", layer.post_attention_layernorm)
            _timed(parts, "attention", layer.self_attn)
            _timed(parts, "moe", layer.mlp)
            _timed(parts, "  of which router", layer.mlp.gate)
        _timed(parts, "lm head", model.lm_head)
        prompt = torch.randint(3, args.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
        runs = []
        for run in range(args.runs + 1):  # run 0 warms up
            nxt = model(prompt, 0, last_only=True)[-1].argmax().view(1)
            parts.clear()
            t0 = time.perf_counter()
            for pos in range(args.prompt_len, args.prompt_len + args.tokens):
                nxt = model(nxt, pos)[-1].argmax().view(1)
            if run:
                runs.append(
                    ((time.perf_counter() - t0) / args.tokens, {k: v / args.tokens for k, v in parts.items()})
                )
        runs.sort(key=lambda r: r[0])
        step, split = runs[len(runs) // 2]
        print(
            f"decode step: {step * 1e3:.2f} ms ({1 / step:.1f} tok/s), median of {args.runs} runs of "
            f"{args.tokens} steps, {args.layers} layers, {args.threads} threads"
        )
        for name in ("norms", "attention", "moe", "  of which router", "lm head"):
            print(f"  {name:18s} {split.get(name, 0.0) * 1e3:6.2f} ms")
        rest = step - sum(t for name, t in split.items() if not name.startswith(" "))
        print(f"  {'rest':18s} {rest * 1e3:6.2f} ms  (embedding, layer loop, argmax)")
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
