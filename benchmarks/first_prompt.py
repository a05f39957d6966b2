"""The first prompt of a fresh `moeinf run`, with the default budget against explicit ones (issue 17).

Each repetition is a new process (a cold expert cache, the load included), the budgets alternated so
that a busy machine slows them alike. Prints a markdown table of medians with the range over the
repetitions: load duration, prompt eval rate, eval rate, and the expert cache line of the last run.

    MOEINF_HOME=... flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/first_prompt.py smollm2-moe \\
        --budgets default,25% -r 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

PROMPT = "What is the capital of France?"
_DURATION = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}


def seconds(text: str) -> float:
    """Go's duration text as Ollama prints it (``1m2.5s``, ``751.19ms``) in seconds."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(h|ms|µs|us|ns|m|s)", text):
        total += float(value) * _DURATION[unit]
    return total


def run_once(model: str, budget: str, prompt: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "moeinf_cli", "run", model, prompt, "--verbose", "--temperature", "0", "-n", str(n)]
    if budget != "default":
        cmd += ["--expert-budget", budget]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    fields = dict(re.findall(r"^([a-z ]+):\s+(.*)$", r.stderr, re.M))
    return {
        "load_s": seconds(fields["load duration"]),
        "prompt_rate": float(fields["prompt eval rate"].split()[0]),
        "eval_rate": float(fields["eval rate"].split()[0]),
        "first_prompt_s": seconds(fields["load duration"]) + seconds(fields["prompt eval duration"]),
        "cache": fields.get("expert cache", ""),
        "answer": r.stdout.strip(),
    }


def cell(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else f"{med:{fmt}}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--budgets", default="default,25%", help="comma-separated; 'default' passes no --expert-budget")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-n", type=int, default=8, help="tokens to generate")
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()
    budgets = args.budgets.split(",")
    runs: dict[str, list[dict]] = {b: [] for b in budgets}
    for i in range(args.repetitions):
        for b in budgets:
            runs[b].append(run_once(args.model, b, args.prompt, args.n))
            print(f"rep {i + 1}, {b}: {runs[b][-1]['prompt_rate']:.2f} t/s prompt eval", file=sys.stderr)
    print("| budget | load duration s | prompt eval t/s | load + prompt eval s | eval t/s | expert cache (last run) |")
    print("|---|---:|---:|---:|---:|---|")
    for b in budgets:
        rs = runs[b]
        name = "default (no `--expert-budget`)" if b == "default" else f"`--expert-budget {b}`"
        print(f"| {name} | {cell([r['load_s'] for r in rs], '.2f')} | {cell([r['prompt_rate'] for r in rs], '.1f')} | "
              f"{cell([r['first_prompt_s'] for r in rs], '.2f')} | {cell([r['eval_rate'] for r in rs], '.1f')} | "
              f"{rs[-1]['cache']} |")
    answers = {r["answer"] for rs in runs.values() for r in rs}
    print(f"\nanswers: {' / '.join(sorted(answers))!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
