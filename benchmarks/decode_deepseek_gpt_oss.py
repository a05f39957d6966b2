"""Decode tokens/s of moeinf vs transformers' ``generate`` on DeepSeek-V3- and gpt-oss-shaped models
(CPU, bf16 by default, all experts resident), the same way as ``decode_vs_transformers.py`` does for Mixtral.

Random models made with transformers (``save_pretrained``), pulled into a temporary store with
moeinf's pull, then both engines decode greedily from the same prompt in this process, same dtype
and thread count; decode time runs from the first generated token to the last (prefill excluded).
Medians over ``--runs`` runs after a warm-up run, and their ratio. The checkpoint is saved in float32
and both engines load it in ``--dtype``.

Shapes (default ``--hidden 1024 --layers 8``): DeepSeek-V3: MLA with q_lora 384, kv_lora 256, nope 64,
rope 32, v 64, 16 heads; first layer dense; 16 routed experts of 512 in 4 groups (top-2 groups), top-4,
one shared expert. gpt-oss: 16 heads of 64 (4 KV heads) with sinks, sliding window 128 on every other
layer, 16 experts of 1024 with biases, top-4.

    flock /tmp/moeinf-heavy.lock .venv/bin/python benchmarks/decode_deepseek_gpt_oss.py [--families deepseek_v3 gpt_oss]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_vs_transformers import alternate  # noqa: E402


def config_for(family: str, a: argparse.Namespace):
    import transformers as tf

    common = dict(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=16,
        max_position_embeddings=4096, initializer_range=0.05, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **common, num_key_value_heads=16, intermediate_size=2 * a.hidden, moe_intermediate_size=512,
            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, routed_scaling_factor=2.5, norm_topk_prob=True,
        )
    if family == "gpt_oss":
        return tf.GptOssConfig(
            **common, num_key_value_heads=4, head_dim=64, intermediate_size=1024, num_local_experts=16,
            num_experts_per_tok=4, sliding_window=128,
        )
    raise SystemExit(f"unknown family {family!r}")


def run_family(family: str, a: argparse.Namespace, work: Path) -> None:
    import transformers as tf

    from engine.model.loader import load_model
    from engine.store.pull import pull_model

    ckpt = work / f"ckpt-{family}"
    if not (ckpt / "config.json").exists():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config_for(family, a), dtype=torch.float32)
        model.save_pretrained(str(ckpt))
        del model
    store = pull_model(str(ckpt), name=f"bench-{family.replace('_', '-')}").path
    dtype = getattr(torch, a.dtype)
    ref = tf.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    ours = load_model(store, dtype=dtype, max_seq_len=a.prompt_len + a.tokens + 8)
    n_params = sum(p.numel() for p in ref.parameters())
    prompt = torch.randint(3, a.vocab, (a.prompt_len,), generator=torch.Generator().manual_seed(0))
    tf_rates, our_rates, tf_tokens, our_tokens = alternate(ref, ours, prompt, a.tokens, a.runs)
    same = sum(x == y for x, y in zip(tf_tokens, our_tokens, strict=True))
    tf_med, our_med = statistics.median(tf_rates), statistics.median(our_rates)
    print(f"{family}: {n_params / 1e6:.0f} M parameters, {a.dtype}, {a.threads} threads, prompt {a.prompt_len}, "
          f"{a.tokens} tokens, median of {a.runs} runs")
    print(f"  transformers generate: {tf_med:6.2f} tok/s  (runs: {', '.join(f'{x:.2f}' for x in tf_rates)})")
    print(f"  moeinf               : {our_med:6.2f} tok/s  (runs: {', '.join(f'{x:.2f}' for x in our_rates)})")
    print(f"  ratio moeinf/transformers: {our_med / tf_med:.2f}x   (greedy tokens identical: {same}/{a.tokens})")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["deepseek_v3", "gpt_oss"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="bf16: random-weight logits are near-tied, so greedy continuations drift apart within a few "
                        "tokens in either engine; float32: the tokens are identical")
    p.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and store here (default: a temp dir)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="moeinf-bench-") as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MOEINF_HOME"] = str(work / "home")
        t = time.perf_counter()
        for family in a.families:
            run_family(family, a, work)
        print(f"total {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
