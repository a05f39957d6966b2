"""`moeinf serve` under load: requests/s and tokens/s for 1, 2 and 4 concurrent clients, and the time to
first token of a 10-turn conversation's last turn with and without KV prefix reuse.

Starts ``moeinf serve MODEL --port 0`` as a subprocess (in ``$MOEINF_HOME``) and drives it with the
official ``openai`` client. Throughput: each of N client threads sends ``--requests`` chat requests one
after another (distinct prompts, greedy, ``--max-tokens`` tokens each); requests/s and generated
tokens/s are over the wall time of the whole round. Prefix reuse: a 10-turn conversation is built
once; then, alternately, turn 9 is replayed (the KV cache then holds turns 1-9) and turn 10 is streamed
either normally (the resent history is reused) or with ``cache_prompt: false`` (the whole history is
prefilled again); the time to the first streamed text is taken at the client. Rounds alternate the
compared settings; medians and the min-max spread over ``--runs`` are printed.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/serve_throughput.py smollm2-moe
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three planets.",
    "What is 12 times 12?",
    "Who wrote Hamlet?",
    "What do bees make?",
    "How many days are in a week?",
    "What is water made of?",
    "Tell me a fact about the Moon.",
    "What is the largest ocean?",
    "What language is spoken in Brazil?",
    "What is the boiling point of water?",
    "Give me a synonym for happy.",
    "What colour are bananas?",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """The server process and its address (read from its log; its access log is then read and dropped)."""
    import httpx

    cmd = [sys.executable, "-m", "moeinf_cli", "serve", args.model, "--port", "0", "--ctx", str(args.ctx)]
    cmd += ["--batch-size", str(args.batch_size)]
    if args.expert_budget:
        cmd += ["--expert-budget", args.expert_budget]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = None
    for line in proc.stderr:
        if m := re.search(r"on (http://[\d.]+:\d+) ", line):
            url = m.group(1)
            break
    if url is None:
        raise SystemExit("the server exited before listening")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.1)
    return proc, url


def throughput(client, model: str, n: int, requests: int, max_tokens: int) -> tuple[float, float]:
    tokens = [0] * n

    def worker(i: int) -> None:
        for k in range(requests):
            q = QUESTIONS[(i * requests + k) % len(QUESTIONS)]
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0
            )
            tokens[i] += r.usage.completion_tokens

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return n * requests / wall, sum(tokens) / wall


def first_token_s(client, model: str, messages: list[dict], max_tokens: int, reuse: bool) -> float:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"cache_prompt": reuse},
    )
    ttft = None
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan")


def fmt(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--expert-budget", default=None)
    ap.add_argument("--batch-size", type=int, default=1, help="the server's --batch-size (1: one at a time)")
    args = ap.parse_args()
    import openai

    proc, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        clients = [int(c) for c in args.clients.split(",")]
        throughput(client, args.model, 1, 1, args.max_tokens)  # warm-up
        rates: dict[int, list[tuple[float, float]]] = {n: [] for n in clients}
        for _ in range(args.runs):
            for n in clients:
                rates[n].append(throughput(client, args.model, n, args.requests, args.max_tokens))
        print(f"{args.model}, {args.requests} requests per client, {args.max_tokens} tokens each, greedy")
        print("| clients | requests/s | tokens/s |\n|---|---|---|")
        for n in clients:
            print(f"| {n} | {fmt([r[0] for r in rates[n]])} | {fmt([r[1] for r in rates[n]])} |")

        history: list[dict] = []
        for q in QUESTIONS[: args.turns - 1]:
            history.append({"role": "user", "content": q})
            r = client.chat.completions.create(
                model=args.model, messages=history, max_tokens=24, temperature=0
            )
            history.append({"role": "assistant", "content": r.choices[0].message.content})
        last = [*history, {"role": "user", "content": QUESTIONS[args.turns - 1]}]
        turn9 = history[:-1]
        ttft: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.runs):
            for reuse in (True, False):
                client.chat.completions.create(model=args.model, messages=turn9, max_tokens=24, temperature=0)
                ttft[reuse].append(first_token_s(client, args.model, last, 8, reuse))
        print(f"\ntime to first token of turn {args.turns} ({args.turns - 1} turns of history)")
        print("| KV prefix reuse | time to first token |\n|---|---|")
        for reuse in (True, False):
            print(
                f"| {'on' if reuse else 'off (cache_prompt: false)'} | {fmt([t * 1e3 for t in ttft[reuse]], ' ms')} |"
            )
    finally:
        proc.send_signal(2)
        proc.wait(60)


if __name__ == "__main__":
    main()
