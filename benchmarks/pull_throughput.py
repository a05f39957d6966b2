"""How fast `moeinf pull` converts a local checkpoint, next to a plain copy of the same bytes.

Builds a synthetic Mixtral-shaped checkpoint (per-expert tensors, bf16, random weights, hub-style
shards with an index), then, several times: copies the shards with shutil (the disk's own speed for
this job) and pulls the directory into a fresh store in a child process (conversion MB/s and the
child's peak RSS). Prints medians and the ratio. Heavy: run under `flock /tmp/moeinf-heavy.lock`.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/pull_throughput.py --layers 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def build_checkpoint(out: Path, layers: int, hidden: int, inter: int, experts: int, vocab: int, shard_mb: int) -> int:
    """Write the checkpoint; returns its size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8,
           "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab, "dtype": "bfloat16",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", r(vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        kv = hidden // 2
        tensors += [(p + "self_attn.q_proj.weight", r(hidden, hidden)), (p + "self_attn.k_proj.weight", r(kv, hidden)),
                    (p + "self_attn.v_proj.weight", r(kv, hidden)), (p + "self_attn.o_proj.weight", r(hidden, hidden)),
                    (p + "input_layernorm.weight", r(hidden)), (p + "post_attention_layernorm.weight", r(hidden)),
                    (p + "block_sparse_moe.gate.weight", r(experts, hidden))]
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors += [(q + "w1.weight", r(inter, hidden)), (q + "w2.weight", r(hidden, inter)), (q + "w3.weight", r(inter, hidden))]
    tensors += [("model.norm.weight", r(hidden)), ("lm_head.weight", r(vocab, hidden))]

    shards, cur, size = [], {}, 0
    for name, t in tensors:
        if cur and size + t.numel() * 2 > shard_mb << 20:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += t.numel() * 2
    shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname))
        total += (out / fname).stat().st_size
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def timed_copy(src: Path, dst: Path) -> float:
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    subprocess.run(["sync"], check=False)
    return time.perf_counter() - t


_CHILD = """
import sys, threading, time
import torch  # counted in the baseline
from engine.store.pull import pull_model

def anon_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))

base, peak, done = anon_kib(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.005)
th = threading.Thread(target=sample)
th.start()
t = time.perf_counter()
pull_model(sys.argv[1], name="bench")
secs = time.perf_counter() - t
done.append(1)
th.join()
print(secs, peak[0] - base)
"""


def timed_pull(src: Path, home: Path) -> tuple[float, int]:
    """Seconds and the growth of anonymous memory (KiB, above torch's import) of `pull_model` in a child."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(src)], capture_output=True, text=True, check=True,
                         env={"MOEINF_HOME": str(home), "PATH": "/usr/bin:/bin"})
    secs, extra = out.stdout.strip().splitlines()[-1].split()
    return float(secs), int(extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        root = Path(tmp)
        size = build_checkpoint(root / "src", args.layers, args.hidden, args.intermediate, args.experts, args.vocab,
                                args.shard_mb)
        copies, pulls, peaks = [], [], []
        for i in range(args.runs):
            copies.append(timed_copy(root / "src", root / f"copy{i}"))
            shutil.rmtree(root / f"copy{i}")
            secs, peak = timed_pull(root / "src", root / f"home{i}")
            pulls.append(secs)
            peaks.append(peak)
            shutil.rmtree(root / f"home{i}")
        mb = size / 1e6
        copy_s, pull_s = statistics.median(copies), statistics.median(pulls)
        print(f"checkpoint: {mb:.0f} MB in {len(list((root / 'src').glob('*.safetensors')))} shards, "
              f"{args.layers} layers x {args.experts} experts, bf16")
        print(f"plain copy: median {copy_s:.2f} s ({mb / copy_s:.0f} MB/s) over {args.runs} runs")
        print(f"moeinf pull: median {pull_s:.2f} s ({mb / pull_s:.0f} MB/s), {pull_s / copy_s:.2f}x the copy time")
        print(f"pull peak anonymous memory above the torch import: {max(peaks) / 1024:.0f} MiB (largest source "
              f"tensor {args.vocab * args.hidden * 2 / 2**20:.0f} MiB, shards of {args.shard_mb} MiB, source mapped, "
              "not counted)")


if __name__ == "__main__":
    main()
