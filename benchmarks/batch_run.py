"""`moeinf run --batch` over many prompts of a store model against running them one at a time.

Three ways through the same N prompts (greedy, -n tokens each, EOS honoured), all through the CLI:

* batch: ``moeinf run MODEL --batch PROMPTS --output OUT --batch-size B``, one process;
* one at a time in one process: the same command with ``--batch-size 1`` (each prompt alone, no
  process start per prompt: the engine's own per-sequence cost);
* single runs: ``moeinf run MODEL "PROMPT"`` once per prompt, a process each (what a shell loop does);
  only the first ``--singles`` prompts are run and the time is scaled to all N (printed as such).

Reported: wall time, generated tokens, tokens/s, and how many batch replies are identical to the
one-at-a-time replies (bf16: a batch's matrix products round differently from one row's).

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/batch_run.py --model smollm2-moe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Brazil", "Egypt", "India", "Kenya",
             "Norway", "Peru", "Chile", "Greece", "Poland", "Mexico", "Ireland", "Portugal", "Sweden", "Turkey"]
TEMPLATES = [
    "What is the capital of {c}?",
    "Name one famous food from {c}.",
    "Write one sentence about the weather in {c}.",
    "Which language do people speak in {c}?",
    "Give me a fun fact about {c}.",
    "What continent is {c} in?",
    "Suggest a name for a cat from {c}.",
    "Describe the flag of {c} in a few words.",
    "What is a popular sport in {c}?",
    "Write a haiku about {c}.",
]


def prompts(n: int) -> list[str]:
    out = [t.format(c=c) for t in TEMPLATES for c in COUNTRIES]
    return [out[i % len(out)] for i in range(n)]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moeinf_cli", *args]


def timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("-n", "--num-predict", type=int, default=16)
    ap.add_argument("--singles", type=int, default=20, help="prompts run as separate processes (scaled to all)")
    ap.add_argument("--expert-budget", default="100%")
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    env = dict(os.environ)
    common = ["-n", str(a.num_predict), "--temperature", "0", "--expert-budget", a.expert_budget, "--ctx", str(a.ctx)]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        items = prompts(a.prompts)
        src.write_text("\n".join(items) + "\n")
        results = {}
        for label, size in (("batch", a.batch_size), ("one at a time", 1)):
            out = Path(tmp) / f"out-{size}.jsonl"
            wall, r = timed(cli("run", a.model, "--batch", str(src), "-o", str(out), "--batch-size", str(size), *common), env)
            lines = [json.loads(x) for x in out.read_text().splitlines()]
            tokens = sum(x["eval_count"] for x in lines)
            results[label] = (wall, tokens, [x["response"] for x in lines])
            print(f"{label:>14} (batch size {size:>2}): {len(lines)} prompts, {tokens} tokens, {wall:7.1f} s, "
                  f"{tokens / wall:6.2f} tokens/s   [{r.stderr.strip().splitlines()[-1]}]", flush=True)
        t_single = 0.0
        k = min(a.singles, len(items))
        single_tokens = 0
        for p in items[:k]:
            wall, r = timed(cli("run", a.model, p, *common, "--verbose"), env)
            t_single += wall
            for line in r.stderr.splitlines():
                if line.startswith("eval count:"):
                    single_tokens += int(line.split()[2])
        scale = len(items) / k
        print(f"{'single runs':>14} ({k} processes, scaled x{scale:.0f}): {single_tokens * scale:.0f} tokens, "
              f"{t_single * scale:7.1f} s, {single_tokens / t_single:6.2f} tokens/s", flush=True)
        b, one = results["batch"], results["one at a time"]
        same = sum(x == y for x, y in zip(b[2], one[2], strict=True))
        print(f"batch vs one at a time: {one[0] / b[0]:.2f}x faster; vs single runs {t_single * scale / b[0]:.2f}x; "
              f"{same} of {len(items)} replies identical")


if __name__ == "__main__":
    main()
