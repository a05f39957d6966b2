"""moeinf against llama.cpp on the same GGUF files: decode and prefill tokens/s, all resident, CPU.

A Mixtral-shaped model (default: hidden 1024, expert intermediate 3584, 8 layers, 8 experts, top-2,
vocab 32000; random weights) is made with transformers (``save_pretrained``, bf16, with a small
Llama-style BPE tokenizer written here), converted by llama.cpp's own ``convert_hf_to_gguf.py`` to a
BF16 GGUF and then by ``llama-quantize`` to Q8_0 and Q4_K_M. Each GGUF is pulled into a store of
its own (``moeinf pull FILE``: blocks kept as they are). The dense SmolLM2-135M-Instruct Q4_1 GGUF of
``make demo`` (``demo-cache/``, or ``$MOEINF_DEMO_CACHE``) is the second case, pulled as it is (no
upcycling). ``--formats`` and ``--smollm ''`` pick the cases (one locked invocation per case keeps each
short).

Timing (the default step): rounds interleave the two engines on each file, one fresh process each,
after one untimed warm-up round: ``moeinf bench NAME -p P -n N -r 1 --expert-budget 100%`` (its
prefill t/s and decode t/s; for the dense SmolLM2, which ``moeinf bench`` does not take, the same
measurement by this script in a process of its own: ``dense_timing``), and llama-bench on the same file with ``-t THREADS --repack 0`` (its AMX
repacking crashes on this machine's CPU): ``-p P -n 0`` for prefill, ``-p 0 -n N -d P`` for decode
after a P-token context, as moeinf's decode follows its P-token prompt. Printed: the median over the
rounds of each figure, its spread (min-max), moeinf/llama.cpp as the ratio of medians, the load
average before and after.

``--check``: fidelity of the llama.cpp-converted files. The BF16 GGUF dequantised by moeinf's GGUF
reader (the gguf package's reference dequantiser) must give back the transformers checkpoint's
tensors exactly (names, llama.cpp's Q/K permutation, the merged expert tensors); then, per
quantised file, moeinf on the kept blocks (float32) against transformers on the same file
dequantised: the largest logit difference over a 32-token greedy continuation, and how many greedy
tokens agree (moeinf with ``--activations``: under ``auto`` the k-quants' products are rounded to int8 on
every forward, as llama.cpp rounds them; ``float32`` checks the unrounded kernels).

    .venv/bin/python benchmarks/vs_llamacpp.py --prepare                 # build the files, pull them
    .venv/bin/python benchmarks/vs_llamacpp.py --check                   # fidelity, not timed
    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/vs_llamacpp.py --runs 5

llama.cpp itself: ``bash scripts/build_llamacpp.sh /work/llama.cpp-build`` (``--llamacpp``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_GGUF = Path(os.environ.get("MOEINF_DEMO_CACHE", REPO / "demo-cache")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTS = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}  # our name -> llama-quantize's type


# ---------------------------------------------------------------- the model and its files


def make_tokenizer(out: Path, vocab: int) -> None:
    """A Llama/Mistral-style BPE tokenizer (byte fallback, "▁" for spaces) of exactly ``vocab`` tokens.

    Its merges are synthetic (every pair of a small alphabet, then triples), which is all the
    converter (``LlamaHfVocab``) and the engines need: the benchmark feeds token ids, not text."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    chars = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)] + chars
    merges: list[tuple[str, str]] = []
    level = chars
    while len(tokens) < vocab:
        nxt = []
        for a in level:
            for b in chars:
                if len(tokens) >= vocab:
                    break
                merges.append((a, b))
                tokens.append(a + b)
                nxt.append(a + b)
        level = nxt
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096,
    }, indent=2))


def make_checkpoint(out: Path, args: argparse.Namespace) -> Path:
    """A random Mixtral-shaped transformers checkpoint in ``out`` (bf16; reused when complete)."""
    if (out / "done").exists():
        return out
    import torch
    import transformers as tf

    config = tf.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
        initializer_range=0.05, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1 so that a mix-up of norm weights shows
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    make_tokenizer(out, args.vocab)
    (out / "done").write_text("")
    return out


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def convert(ckpt: Path, work: Path, llamacpp: Path, wanted: list[str]) -> dict[str, Path]:
    """The BF16 GGUF by llama.cpp's converter and the ``wanted`` llama-quantize'd ones (Q8_0, Q4_K_M)."""
    src = llamacpp / "src" / "llama.cpp"
    files = {"bf16": work / "mixtral-bf16.gguf"}
    if not files["bf16"].exists():
        # llama.cpp's own gguf package; sentencepiece, which the converter imports, from the build's pydeps/
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(llamacpp / "pydeps")]))
        tmp = files["bf16"].with_suffix(".tmp")
        run([sys.executable, src / "convert_hf_to_gguf.py", ckpt, "--outtype", "bf16", "--outfile", tmp], env=env)
        tmp.rename(files["bf16"])
    for name, qtype in QUANTS.items():
        if name not in wanted:
            continue
        files[name] = work / f"mixtral-{name}.gguf"
        if not files[name].exists():
            tmp = files[name].with_suffix(".tmp")
            run([llamacpp / "build" / "bin" / "llama-quantize", files["bf16"], tmp, qtype, "2"],
                stdout=subprocess.DEVNULL)
            tmp.rename(files[name])
    return files


def moeinf_env(home: Path, threads: int) -> dict[str, str]:
    return dict(os.environ, MOEINF_HOME=str(home), PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))


def pull(gguf: Path, home: Path, name: str, threads: int) -> None:
    if (home / "models" / name / "manifest.json").exists():
        return
    run([sys.executable, "-m", "moeinf_cli", "pull", gguf, "--name", name], env=moeinf_env(home, threads))


def cases(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """(label, GGUF file, store name) for every file benchmarked; builds and pulls what is missing."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    out = []
    if args.formats:
        ckpt = make_checkpoint(work / "hf", args)
        files = convert(ckpt, work, args.llamacpp, args.formats)
        for fmt in args.formats:
            pull(files[fmt], home, f"mixtral-{fmt}", args.threads)
            out.append((f"Mixtral-shaped {fmt.upper()}", files[fmt], f"mixtral-{fmt}"))
    if args.smollm and args.smollm.exists():
        pull(args.smollm, home, "smollm2-135m-q4_1", args.threads)
        out.append(("SmolLM2-135M Q4_1 (dense)", args.smollm, "smollm2-135m-q4_1"))
    elif args.smollm:
        print(f"note: {args.smollm} not found (run `make demo` once); SmolLM2 skipped")
    return out


# ---------------------------------------------------------------- timing


def moeinf_bench(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """(prefill t/s, decode t/s) of one ``moeinf bench`` repetition, all resident; a dense model (which
    ``moeinf bench`` does not take) by ``dense_timing`` in a process of its own, timed the same way."""
    env = moeinf_env(args.work / "home", args.threads)
    if (args.work / "home" / "models" / name / "experts").exists():
        cmd = ["-m", "moeinf_cli", "bench", name, "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", "1",
               "--expert-budget", "100%", "--activations", args.activations, "--json"]
        cp = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, check=True)
        row = json.loads(cp.stdout)["rows"][0]
        return row["prefill_tps"], row["decode_tps"]
    cmd = [__file__, "--time-dense", name, "-p", str(args.n_prompt), "-n", str(args.n_gen),
           "--threads", str(args.threads), "--work", str(args.work), "--activations", args.activations]
    cp = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, check=True)
    row = json.loads(cp.stdout.strip().splitlines()[-1])
    return row["prefill_tps"], row["decode_tps"]


def dense_timing(name: str, args: argparse.Namespace) -> None:
    """What ``moeinf bench`` measures, for a dense model: load it (its default dtype), a random
    ``n_prompt``-token prompt in one forward (prefill t/s: the prompt over the time to its first
    token), then ``n_gen`` greedy steps (decode t/s: one over the mean step). Prints one JSON line."""
    import torch

    from engine.model.loader import load_model
    from engine.runtime.devices import resolve_dtype
    from engine.store.opened import open_model

    torch.set_num_threads(args.threads)
    store = open_model(name)
    dtype = resolve_dtype(None, store.stored_dtype, torch.device("cpu"))
    model = load_model(store, dtype=dtype, max_seq_len=args.n_prompt + args.n_gen + 1, activations=args.activations)
    vocab = int(store.config.get("vocab_size") or 1000)
    prompt = torch.randint(0, vocab, (args.n_prompt,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    tok = int(model.forward(prompt, 0, last_only=True)[-1].argmax())
    ttft = time.perf_counter() - t0
    steps = []
    for i in range(args.n_gen):
        t = time.perf_counter()
        tok = int(model.forward(torch.tensor([tok]), args.n_prompt + i)[-1].argmax())
        steps.append(time.perf_counter() - t)
    print(json.dumps({"prefill_tps": args.n_prompt / ttft, "decode_tps": 1.0 / statistics.mean(steps),
                      "dtype": str(dtype)}))


def llama_bench(gguf: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(prefill t/s, decode t/s after an n_prompt context) of llama-bench, one repetition each."""
    exe = args.llamacpp / "build" / "bin" / "llama-bench"
    common = [exe, "-m", gguf, "-t", args.threads, "--repack", "0", "-r", "1", "-o", "json"]

    def one(extra: list) -> float:
        cp = subprocess.run([str(c) for c in common + extra], capture_output=True, text=True, check=True)
        return float(json.loads(cp.stdout)[0]["avg_ts"])

    pp = one(["-p", args.n_prompt, "-n", 0])
    tg = one(["-p", 0, "-n", args.n_gen, "-d", args.n_prompt])
    return pp, tg


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def median_spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def timing(items: list[tuple[str, Path, str]], args: argparse.Namespace) -> None:
    print(f"load average before: {loadavg()}", flush=True)
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for label, gguf, name in items:
        res = results.setdefault(label, {"moeinf": [], "llama.cpp": []})
        for rnd in range(args.runs + 1):  # round 0 warms both up and is not counted
            order = ["moeinf", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "moeinf"]
            for engine in order:
                t0 = time.perf_counter()
                pp, tg = moeinf_bench(name, args) if engine == "moeinf" else llama_bench(gguf, args)
                print(f"  {label} round {rnd} {engine}: prefill {pp:.1f} t/s, decode {tg:.1f} t/s "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                if rnd:
                    res[engine].append((pp, tg))
    print(f"load average after: {loadavg()}\n")
    print(f"{args.threads} threads, all resident, prompt {args.n_prompt}, {args.n_gen} tokens decoded, "
          f"medians of {args.runs} interleaved rounds (min-max)\n")
    print("| model (GGUF) | moeinf decode t/s | llama.cpp decode t/s | decode ratio | moeinf prefill t/s "
          "| llama.cpp prefill t/s | prefill ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, res in results.items():
        m, ll = res["moeinf"], res["llama.cpp"]
        m_pp, m_tg = [x[0] for x in m], [x[1] for x in m]
        l_pp, l_tg = [x[0] for x in ll], [x[1] for x in ll]
        print(f"| {label} | {median_spread(m_tg)} | {median_spread(l_tg)} | "
              f"{statistics.median(m_tg) / statistics.median(l_tg):.2f}x | {median_spread(m_pp)} | "
              f"{median_spread(l_pp)} | {statistics.median(m_pp) / statistics.median(l_pp):.2f}x |")


# ---------------------------------------------------------------- fidelity


def check(items: list[tuple[str, Path, str]], args: argparse.Namespace) -> None:
    import torch
    import transformers as tf

    from engine.model.loader import load_model
    from engine.store.gguf import gguf_to_checkpoint

    tf.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    work, home = args.work, args.work / "home"
    if args.formats:  # the converter's file maps back to the checkpoint it came from, exactly
        ref_dir = gguf_to_checkpoint(work / "mixtral-bf16.gguf", work / "ref-bf16", "float32")
        orig = tf.AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32).state_dict()
        back = tf.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).state_dict()
        assert orig.keys() == back.keys(), sorted(set(orig) ^ set(back))[:8]
        bad = [k for k in orig if not torch.equal(orig[k], back[k])]
        print(f"BF16 GGUF (llama.cpp's converter) read back by moeinf: {len(orig)} tensors, "
              f"{len(bad)} differ from the transformers checkpoint {bad[:4]}", flush=True)
        del orig, back
    prompt = [1, 5, 17, 99, 3, 250, 1000, 31, 7, 4000]
    for label, gguf, name in items:
        if "bf16" in name:
            continue
        ref_dir = gguf_to_checkpoint(gguf, work / f"ref-{name}", "float32")  # the gguf package's dequantiser
        ref = tf.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                               eos_token_id=[], pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
            seq = gen[0].tolist()
            ref_logits = ref(torch.tensor([seq])).logits[0]
        del ref
        ours = load_model(home / "models" / name, dtype=torch.float32, max_seq_len=128, activations=args.activations)
        with torch.no_grad():
            ours_logits = ours(torch.tensor(seq), 0)
            logits = ours(torch.tensor(prompt), 0)
            pos, toks = len(prompt), []
            for _ in range(32):
                toks.append(int(logits[-1].argmax()))
                logits = ours(torch.tensor([toks[-1]]), pos)
                pos += 1
        diff = (ours_logits - ref_logits).abs().max().item()
        ref_toks = seq[len(prompt):]
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref_toks, strict=True)) if a != b), 32)
        top2 = ref_logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1])[len(prompt) - 1 + agree].item() if agree < 32 else float("nan")
        print(f"{label}: largest logit difference {diff:.2e} (logits up to {ref_logits.abs().max():.1f}); "
              f"greedy tokens identical for {agree} of 32 steps"
              + (f" (they part at a top-2 margin of {margin:.2e})" if agree < 32 else ""), flush=True)
        del ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llamacpp", type=Path, default=Path("/work/llama.cpp-build"),
                   help="the output dir of scripts/build_llamacpp.sh")
    p.add_argument("--work", type=Path, default=Path("/tmp/moeinf-vs-llamacpp"),
                   help="checkpoint, GGUF files and store (kept between runs)")
    p.add_argument("--formats", default="q8_0,q4_k_m", help="Mixtral-shaped files: q8_0, q4_k_m, bf16 ('' for none)")
    p.add_argument("--smollm", default=str(DEMO_GGUF), help="the demo's SmolLM2 Q4_1 GGUF ('' for none)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--activations", default="auto", help="moeinf's --activations: auto, float32 or int8")
    p.add_argument("--prepare", action="store_true", help="only build the files and pull them")
    p.add_argument("--check", action="store_true", help="fidelity against transformers instead of timing")
    p.add_argument("--time-dense", default=None, metavar="NAME", help=argparse.SUPPRESS)  # moeinf_bench's child
    args = p.parse_args()
    if args.time_dense:
        dense_timing(args.time_dense, args)
        return
    args.formats = [f for f in args.formats.split(",") if f]
    args.smollm = Path(args.smollm) if args.smollm else None
    items = cases(args)
    if args.prepare:
        return
    if args.check:
        check(items, args)
    else:
        timing(items, args)


if __name__ == "__main__":
    main()
