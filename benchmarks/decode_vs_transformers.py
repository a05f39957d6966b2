"""Decode tokens/s of moeinf vs transformers' ``generate`` on the same all-resident model (CPU, bf16).

A synthetic Mixtral-shaped model (default: hidden 1024, expert intermediate 3584, 8 layers, 8 experts,
top-2, vocab 32000: ~791 M parameters, ~1.6 GB in bf16) is made with transformers (random weights,
``save_pretrained``), pulled into a temporary store with moeinf's converter, then both engines run
greedy decoding of the same prompt in this process, same dtype, same thread count. Each run decodes
``--tokens`` tokens; decode time is measured from the first generated token to the last (prefill
excluded: a streamer timestamps transformers' tokens, moeinf's loop is timed the same way). Runs
alternate (transformers, moeinf, transformers, ...) after one warm-up run each; printed are the
median tokens/s of each, the ratio of the medians, and the median of the per-pair ratios (each
moeinf run against the transformers run just before it), which is the steadier figure when other
processes share the CPU. The load average is printed too.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_vs_transformers.py

transformers is a benchmark-only dependency (the dev extra), as in the tests.
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


def make_checkpoint(out: Path, args: argparse.Namespace) -> Path:
    """A random Mixtral-shaped transformers checkpoint in ``out`` (reused when already there)."""
    import transformers as tf

    if (out / "config.json").exists():
        return out
    config = tf.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
        initializer_range=0.05, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    return out


class _Stamps:
    """A transformers streamer that timestamps every generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_decode(model, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of transformers' greedy generate, and the generated tokens."""
    stamps = _Stamps()
    ids = prompt[None]
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=0,
            eos_token_id=[], pad_token_id=0, streamer=stamps,
        )
    assert len(stamps.times) == n
    return (n - 1) / (stamps.times[-1] - stamps.times[0]), out[0, len(prompt):].tolist()


def moeinf_decode(model, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of moeinf's model with a greedy loop (prefill, then one token per forward)."""
    tokens: list[int] = []
    logits = model(prompt, 0, last_only=True)
    nxt = logits[-1].argmax().view(1)
    tokens.append(int(nxt))
    t0 = time.perf_counter()
    pos = len(prompt)
    for _ in range(n - 1):
        logits = model(nxt, pos)
        pos += 1
        nxt = logits[-1].argmax().view(1)
        tokens.append(int(nxt))
    return (n - 1) / (time.perf_counter() - t0), tokens


def alternate(ref, ours, prompt: torch.Tensor, tokens: int, runs: int) -> tuple[list, list, list, list]:
    """``runs`` decode runs of each engine, alternating, after one warm-up run each: (transformers'
    tokens/s, moeinf's tokens/s, the last run's tokens of each)."""
    tf_rates, our_rates = [], []
    tf_tokens = our_tokens = None
    for run in range(runs + 1):  # run 0 warms up both
        r, tf_tokens = transformers_decode(ref, prompt, tokens)
        if run:
            tf_rates.append(r)
        r, our_tokens = moeinf_decode(ours, prompt, tokens)
        if run:
            our_rates.append(r)
    return tf_rates, our_rates, tf_tokens, our_tokens


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The Mixtral-shaped model's options (what ``make_checkpoint`` reads) and the run's setup options."""
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and store here (default: a temp dir)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="moeinf-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MOEINF_HOME"] = str(work / "home")
        import transformers as tf

        from engine.model.loader import load_model
        from engine.store.pull import pull_model

        t = time.perf_counter()
        ckpt = make_checkpoint(work / "ckpt", args)
        store = pull_model(str(ckpt), name="bench-mixtral").path
        print(f"checkpoint + store ready in {time.perf_counter() - t:.0f} s: {store}", file=sys.stderr)

        ref = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
        ours = load_model(store, dtype=torch.bfloat16, max_seq_len=args.prompt_len + args.tokens + 8)
        n_params = sum(p.numel() for p in ref.parameters())
        prompt = torch.randint(3, args.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))

        tf_rates, our_rates, tf_tokens, our_tokens = alternate(ref, ours, prompt, args.tokens, args.runs)
        same = 0
        for a, b in zip(tf_tokens, our_tokens, strict=True):
            if a != b:
                break
            same += 1
        tf_med, our_med = statistics.median(tf_rates), statistics.median(our_rates)
        paired = statistics.median(o / t for o, t in zip(our_rates, tf_rates, strict=True))
        print(f"model: Mixtral-shaped, {n_params / 1e6:.0f} M parameters, bf16, {args.threads} threads, "
              f"prompt {args.prompt_len}, {args.tokens} tokens decoded, median of {args.runs} runs")
        print(f"transformers generate: {tf_med:6.2f} tok/s  (runs: {', '.join(f'{x:.2f}' for x in tf_rates)})")
        print(f"moeinf               : {our_med:6.2f} tok/s  (runs: {', '.join(f'{x:.2f}' for x in our_rates)})")
        print(f"ratio moeinf/transformers: {our_med / tf_med:.2f}x (medians), {paired:.2f}x (median of paired runs)")
        print(f"greedy tokens: first {same} of {args.tokens} identical (bf16 roundings differ, random weights)")
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
