"""scripts/cuda_check.py is what a session runs first on a lent GPU machine: it must not rot between loans.
Here it runs on the CPU (its memory check: offloaded against all-resident, bf16 and q4_k experts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "MOEINF_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_check.py"), "--device", "cpu", "--only", "memory",
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "cuda_check.json").read_text())
    assert res["memory/bf16"]["ok"] and res["memory/q4_k"]["ok"]
    assert res["memory/q4_k"]["max_abs_diff"] == 0.0 and res["memory/q4_k"]["tokens_equal"]
