"""`moeinf trace ...` end to end: record on a tiny pulled model, show (+ PNG), import/export, rm, errors."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from runtime_store import pull_tiny

from engine.trace.format import RoutingTrace, load_trace, save_trace


def cli(home, *args):
    env = {**os.environ, "MOEINF_HOME": str(home), "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "moeinf_cli", "trace", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home, root, _ = pull_tiny("mixtral", tmp_path_factory.mktemp("trace"), name="tiny")
    return home, root


def _stored(home, name):
    with np.load(home / "traces" / name / "traces.npz") as d:
        return int(d["requests"]), d["tokens"].tolist(), d["raw_starts"].tolist()


def test_record_text_and_jsonl_and_short_form(store, tmp_path):
    home, _ = store
    txt = tmp_path / "prompts.txt"
    txt.write_text("Why is the sky blue?\n\nTell me a story about a robot.\n")
    r = cli(home, "record", "tiny", "--prompts", str(txt), "-n", "4")
    assert r.returncode == 0, r.stderr
    assert "recorded 2 prompts" in r.stdout
    requests, tokens, starts = _stored(home, "tiny")
    assert requests == 2 and tokens[0] > 0 and tokens[1] > 0 and len(starts) == 2
    jl = tmp_path / "prompts.jsonl"
    jl.write_text(json.dumps({"prompt": "Hello!"}) + "\n"
                  + json.dumps({"messages": [{"role": "user", "content": "Hi there"}]}) + "\n")
    r = cli(home, "tiny", "--prompts", str(jl), "-n", "3")  # no subcommand: record
    assert r.returncode == 0, r.stderr
    assert _stored(home, "tiny")[0] == 4


def test_record_errors_are_one_line(store, tmp_path):
    home, _ = store
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    r = cli(home, "record", "tiny", "--prompts", str(bad))
    assert r.returncode == 1 and r.stderr.strip().startswith("Error:") and len(r.stderr.strip().splitlines()) == 1
    r = cli(home, "record", "no-such-model", "--prompts", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:16 + length]) & 0xFFFFFFFF == struct.unpack(">I", data[16 + length:20 + length])[0]
    return w, h


def test_import_show_png_export_rm(tmp_path):
    home = tmp_path / "home"
    rng = np.random.default_rng(0)
    L, E, k = 4, 16, 2
    ids = rng.integers(0, E, size=(30, L, k))
    ids[:, 2, 0] = 3  # layer 2 always uses expert 3
    src = tmp_path / "in.npz"
    save_trace(RoutingTrace(ids, E, np.array([0, 10, 20]), meta={"model": "x", "phase": "decode"}), src)
    r = cli(home, "import", str(src), "--model", "m")
    assert r.returncode == 0, r.stderr
    assert "3 requests" in r.stdout
    png = tmp_path / "heat.png"
    r = cli(home, "show", "m", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "3 requests" in r.stdout and "effective experts" in r.stdout
    rows = {int(m[1]): m[2] for m in re.finditer(rf"^\s+(\d+)  ([.0-9]{{{E}}})$", r.stdout, re.M)}
    assert sorted(rows) == list(range(L))  # piped: one row of digits per layer, one digit per expert
    assert rows[2][3] == "9"  # layer 2's expert 3 takes every token: the busiest
    w, h = _png_size(png.read_bytes())  # a real PNG (matplotlib: axes, labels, colour bar)
    assert w > 200 and h > 100
    out = tmp_path / "out.npz"
    r = cli(home, "export", "m", str(out))
    assert r.returncode == 0, r.stderr
    back = load_trace(out)
    assert np.array_equal(back.expert_ids, ids) and back.seq_starts.tolist() == [0, 10, 20] and back.num_experts == E
    assert cli(home, "rm", "m").returncode == 0
    r = cli(home, "show", "m")
    assert r.returncode == 1 and "no traces" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_import_rejects_a_non_trace(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    r = cli(tmp_path / "home", "import", str(bad), "--model", "m")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1


def test_import_of_another_shape_is_refused_and_keeps_the_models_traces(store, tmp_path):
    home, _ = store
    r = cli(home, "record", "tiny", "--prompts", str(_prompts(tmp_path)), "-n", "2")
    assert r.returncode == 0, r.stderr
    before = (home / "traces" / "tiny" / "traces.npz").read_bytes()
    wrong = tmp_path / "wrong.npz"
    save_trace(RoutingTrace(np.zeros((5, 30, 2), dtype=np.int64), 8, meta={"phase": "decode"}), wrong)
    r = cli(home, "import", str(wrong), "--model", "tiny")  # 30 layers into the stored tiny model
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "30 MoE layers" in r.stderr
    assert (home / "traces" / "tiny" / "traces.npz").read_bytes() == before

    other = tmp_path / "other-home"  # a model not in the store: its existing traces are never replaced
    ids = np.zeros((6, 4, 2), dtype=np.int64)
    save_trace(RoutingTrace(ids, 16, meta={"phase": "decode"}), tmp_path / "a.npz")
    save_trace(RoutingTrace(ids[:, :3], 16, meta={"phase": "decode"}), tmp_path / "b.npz")
    assert cli(other, "import", str(tmp_path / "a.npz"), "--model", "m").returncode == 0
    kept = (other / "traces" / "m" / "traces.npz").read_bytes()
    r = cli(other, "import", str(tmp_path / "b.npz"), "--model", "m")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "4 MoE layers" in r.stderr
    assert (other / "traces" / "m" / "traces.npz").read_bytes() == kept


def _prompts(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("Hello there\n")
    return p
