"""Per-token cost of the runtime (sampling, detokenising, stop scanning, bookkeeping) over the bare model.

Writes a small random Mixtral-shaped model into a temporary store (``engine.bench.synthetic``), then
decodes ``--tokens`` tokens three ways on the same session, same prompt: a bare loop of
``CausalLM.forward`` + argmax; ``Session.generate`` greedy (temperature 0, no penalty); and
``Session.generate`` with Ollama's default sampling (temperature 0.8, top-k 40, top-p 0.9, repeat
penalty 1.1). Decode tokens/s are medians over ``--runs`` runs after one warm-up; the ratios to the bare
loop are printed. Then the same Session loops run against a stand-in model that returns fixed logits,
which gives the runtime's own cost per token in microseconds. A large vocabulary (default 32000) makes
the sampler's share visible.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/runtime_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOEINF_HOME"] = tmp
        import engine
        from engine.bench.synthetic import make_synthetic_model

        root = make_synthetic_model("overhead", hidden=args.hidden, intermediate=args.intermediate,
                                    num_layers=args.layers, vocab=args.vocab,
                                    dtype=getattr(torch, args.dtype), root=Path(tmp) / "models")
        s = engine.load(root, ctx=1024, dtype=args.dtype, expert_budget="100%")
        prompt = "Why is the sky blue? Explain it to a child."
        ids = s.prompt_ids(prompt, raw=True)
        n = args.tokens

        def bare() -> float:
            with torch.inference_mode():
                logits = s.model.forward(torch.tensor(ids), 0, last_only=True)[-1]
                t0, pos = time.perf_counter(), len(ids)
                for _ in range(n):
                    tok = int(logits.argmax())
                    logits = s.model.forward(torch.tensor([tok]), pos)[-1]
                    pos += 1
                return n / (time.perf_counter() - t0)

        def session(**options) -> float:
            s.reset()
            stats = list(s.generate(prompt, raw=True, num_predict=n + 1, **options))[-1]
            # n + 1 tokens sampled, n forward passes (the last token is not run)
            return n / stats.eval_s

        ways = {
            "bare forward + argmax": bare,
            "Session greedy": lambda: session(temperature=0, repeat_penalty=1.0),
            "Session Ollama defaults": lambda: session(seed=0),
        }
        results = {}
        for name, fn in ways.items():
            fn()  # warm-up
            results[name] = statistics.median(fn() for _ in range(args.runs))
        # the runtime's own cost per token: the same loops against a model that returns fixed logits
        fixed = torch.randn(1, s.model.vocab_size, generator=torch.Generator().manual_seed(0))

        class FixedLogits:
            vocab_size = s.model.vocab_size

            def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
                return fixed.clone() if last_only else fixed.expand(len(tokens), -1).clone()

        s.model = FixedLogits()
        per_token = {}
        for name, options in (("greedy", dict(temperature=0, repeat_penalty=1.0)), ("Ollama defaults", dict(seed=0))):
            session(**options)
            per_token[name] = statistics.median(1e6 / session(**options) for _ in range(args.runs))
        base = results["bare forward + argmax"]
        print(f"model: mixtral-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
              f"{args.dtype}, {args.threads} threads, {n} tokens, median of {args.runs}")
        for name, tps in results.items():
            print(f"{name:26s} {tps:8.1f} tok/s   {tps / base:5.2f}x bare")
        for name, us in per_token.items():
            print(f"runtime cost per token, {name}: {us:.0f} µs (model excluded)")


if __name__ == "__main__":
    main()
