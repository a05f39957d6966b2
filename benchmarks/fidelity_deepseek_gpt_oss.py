"""Fidelity figures of the DeepSeek-V2/V3 and gpt-oss families against transformers on the tiny random
models of tests/tiny_models.py (what tests/test_model_deepseek.py and tests/test_model_gpt_oss.py
assert, printed): worst fp32 prefill |logit difference| over the test prompts, greedy tokens equal
to transformers' generate, and the bf16 errors against the fp32 transformers logits (moeinf's and
transformers' own) with moeinf's top-1 agreement.

    .venv/bin/python benchmarks/fidelity_deepseek_gpt_oss.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import deepseek_gpt_oss_fidelity as fid
    from tiny_models import load_reference

    from engine.model.loader import load_model

    print(f"{'family':<12} {'fp32 max|dlogit|':>17} {'greedy 32 equal':>16} {'bf16 err':>9} {'tf bf16 err':>12} {'top-1':>6}")
    for family in ("deepseek_v2", "deepseek_v3", "gpt_oss"):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, store = fid.build_store(family, Path(tmp))
            ref = load_reference(ckpt)
            model = load_model(store, torch.float32, max_seq_len=fid.MAX_SEQ)
            worst = 0.0
            for ids in fid.prompts():
                with torch.no_grad():
                    want = ref(ids[None]).logits[0]
                worst = max(worst, (model(ids, 0) - want).abs().max().item())
            equal = all(
                fid.greedy(model, p, 32) == fid.reference_greedy(ref, p, 32) for p in fid.prompts(seed=1)[1:3]
            )
            mine, theirs, agree = fid.check_bf16(ckpt, store)
        print(f"{family:<12} {worst:>17.1e} {str(equal):>16} {mine:>9.4f} {theirs:>12.4f} {agree:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
