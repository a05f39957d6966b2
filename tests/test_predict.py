"""`moeinf predict`: the fit verdicts, the forecast's JSON schema, and a hub repo read from headers alone."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, Repo

from engine.bench.forecast import slot_bytes
from engine.bench.machine import PROFILE_FILE, DeviceRates, MachineProfile, machine_key
from engine.bench.predict import SCHEMA, Request, predict
from engine.bench.shape import read_shape, shape_from
from engine.errors import MoeinfError

GiB = 1 << 30
MIXTRAL = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "torch_dtype": "bfloat16",
}


def mixtral_tensors() -> dict[str, tuple[list[int], str]]:
    h, i, v, kv = 4096, 14336, 32000, 1024
    t = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    for layer in range(32):
        p = f"model.layers.{layer}."
        t.update(
            {
                p + "self_attn.q_proj.weight": [h, h],
                p + "self_attn.k_proj.weight": [kv, h],
                p + "self_attn.v_proj.weight": [kv, h],
                p + "self_attn.o_proj.weight": [h, h],
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
                p + "block_sparse_moe.gate.weight": [8, h],
            }
        )
        for e in range(8):
            q = f"{p}block_sparse_moe.experts.{e}."
            t.update({q + "w1.weight": [i, h], q + "w3.weight": [i, h], q + "w2.weight": [h, i]})
    return {k: (s, "BF16") for k, s in t.items()}


def write_header_only(path: Path, tensors: dict[str, tuple[list[int], str]], tail: int = 1 << 20) -> int:
    """A safetensors file with the full header and only ``tail`` bytes of data (the start of the weights)."""
    header, off = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x5a" * tail)
    return 8 + len(raw)


def profile(disk_gbps: float = 2.0) -> MachineProfile:
    cpu = DeviceRates(
        mem_bps=20e9,
        decode_bps={"bf16": 10e9, "q4_k": 8e9},
        prefill_flops={"bf16": 200e9, "q4_k": 100e9},
        total_bytes=64 * GiB,
    )
    return MachineProfile(
        key=machine_key(),
        io="O_DIRECT",
        read_bps={str(1 << 20): disk_gbps * 1e9, str(16 << 20): disk_gbps * 1e9},
        read_spread=0.1,
        read_latency_s=1e-4,
        ram_bytes=64 * GiB,
        devices={"cpu": cpu},
    )


@pytest.fixture(scope="module")
def mixtral():
    tensors = {
        k: (int(s[0]) * (int(s[1]) if len(s) > 1 else 1) * 2, int(s[0]) * (int(s[1]) if len(s) > 1 else 1))
        for k, (s, _) in mixtral_tensors().items()
    }
    return shape_from("mixtral", "hub", MIXTRAL, tensors)


def test_shape_splits_dense_and_experts(mixtral):
    assert mixtral.experts_total == 256
    assert mixtral.expert_bytes == 3 * 4096 * 14336 * 2
    # Mixtral-8x7B: 46.7 B weights, 1.6 B of them dense
    assert 1.5e9 < mixtral.dense_params < 1.7e9
    assert 12.5e9 < mixtral.active_params < 13.0e9


def test_fits_with_12gb_budget(mixtral):
    p = predict(mixtral, profile(), Request(budget="12GB", ctx=4096, available=32 * GiB))
    assert p["fits"] and not p["reasons"]
    assert p["experts"]["slots"] == 12 * 10**9 // slot_bytes(mixtral)
    assert p["memory"]["kv_bytes"] == 2 * 32 * 4096 * 8 * 128 * 2
    assert p["decode_tps_band"][0] <= p["decode_tps"] <= p["decode_tps_band"][1]
    assert 0 < p["hit_rate"]["low"] <= p["hit_rate"]["expected"] <= p["hit_rate"]["high"] < 1
    assert p["max_ctx"] > 4096
    # a faster disk decodes faster at the same budget
    fast = predict(mixtral, profile(disk_gbps=8.0), Request(budget="12GB", available=32 * GiB))
    assert fast["decode_tps"] > p["decode_tps"]


def test_budget_below_one_layer(mixtral):
    p = predict(mixtral, profile(), Request(budget="500MB", available=32 * GiB))
    assert not p["fits"]
    assert "below the 2 one layer uses at once" in p["reasons"][0]
    assert p["decode_tps"] is None


def test_context_whose_kv_cache_does_not_fit(mixtral):
    p = predict(mixtral, profile(), Request(budget="12GB", ctx=200_000, available=20 * GiB))
    assert not p["fits"]
    assert p["reasons"] == [p["reasons"][0]] and "KV cache for 200000 tokens" in p["reasons"][0]
    assert 0 < p["max_ctx"] < 200_000


def test_dense_part_alone_exceeds_memory(mixtral):
    p = predict(mixtral, profile(), Request(budget="10%", available=2 * GiB))
    assert not p["fits"]
    assert "dense weights alone" in p["reasons"][0]
    assert p["max_ctx"] == 0


def test_impossible_inputs_are_one_line_errors(mixtral):
    for req, text in (
        (Request(budget="lots"), "invalid expert budget"),
        (Request(budget="1GB", batch=0), "--batch"),
        (Request(budget="1GB", fmt="q3_x"), "unknown format"),
        (Request(budget="1GB", device="cuda"), "no CUDA GPU"),
    ):
        with pytest.raises(MoeinfError, match=text) as err:
            predict(mixtral, profile(), req)
        assert "\n" not in str(err.value)


def test_quantised_format_shrinks_experts(mixtral):
    p = predict(mixtral, profile(), Request(budget="100%", fmt="q4_k", available=64 * GiB))
    assert p["format"] == "q4_k" and p["fits"]
    assert p["experts"]["bytes_each"] == int(3 * 4096 * 14336 * 4.5 / 8)
    assert p["hit_rate"]["expected"] == 1.0


def test_json_schema(mixtral):
    p = predict(mixtral, profile(), Request(budget="25%", batch=4, available=64 * GiB))
    json.dumps(p)
    assert p["schema"] == SCHEMA
    assert set(p) >= {
        "model",
        "source",
        "family",
        "device",
        "format",
        "policy",
        "batch",
        "ctx",
        "fits",
        "reasons",
        "memory",
        "experts",
        "hit_rate",
        "decode_tps",
        "decode_tps_band",
        "prefill_tps",
        "batch_tps",
        "cold_start_s",
        "max_ctx",
        "machine",
    }
    assert set(p["memory"]) >= {
        "available_bytes",
        "dense_bytes",
        "expert_budget_bytes",
        "kv_bytes",
        "headroom_bytes",
    }
    assert p["experts"]["resident_fraction"] == pytest.approx(0.25, abs=0.01)
    assert "family default" in p["hit_rate"]["source"]
    assert p["batch_tps"] > p["decode_tps"]


def test_local_checkpoint_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL))
    write_header_only(tmp_path / "model.safetensors", mixtral_tensors(), tail=0)
    shape = read_shape(str(tmp_path))
    assert shape.source == "local" and shape.experts_total == 256
    assert shape.expert_bytes == 3 * 4096 * 14336 * 2


def test_predict_hub_repo_reads_headers_only(tmp_path):
    repo = tmp_path / "mixtral"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps(MIXTRAL))
    tensors = mixtral_tensors()
    names = list(tensors)
    half = len(names) // 2
    headers = {}
    index = {"weight_map": {}}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        headers[shard] = write_header_only(repo / shard, {k: tensors[k] for k in part})
        index["weight_map"].update({k: shard for k in part})
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    home = tmp_path / "home"
    home.mkdir()
    (home / PROFILE_FILE).write_text(json.dumps(profile().as_dict()))
    with HubServer({"mistralai/Mixtral-8x7B-v0.1": Repo(repo)}) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "MOEINF_HOME": str(home),
            "NO_PROXY": "127.0.0.1,localhost",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_TOKEN": "",
        }
        r = subprocess.run(
            [sys.executable, "-m", "moeinf_cli", "predict", "mixtral", "--expert-budget", "12GB", "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["source"] == "hub" and out["family"] == "mixtral"
        assert out["experts"]["total"] == 256 and out["experts"]["slots"] == 12 * 10**9 // (
            3 * 4096 * 14336 * 2
        )
        served = {}
        for name, n in hub.served:
            served[name] = served.get(name, 0) + n
        for shard, head in headers.items():
            assert served[shard] == head  # the header, not one byte of tensor data
        assert set(served) == {"config.json", "model.safetensors.index.json", *headers}
        r = subprocess.run(
            [sys.executable, "-m", "moeinf_cli", "predict", "mixtral", "--expert-budget", "12GB"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert "fits" in r.stdout and "decode" in r.stdout and "largest context" in r.stdout


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "MOEINF_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "moeinf_cli", "predict", str(tmp_path / "nope"), "--expert-budget", "1GB"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1


def test_routing_from_a_trace(mixtral):
    """Recorded routing drives the hit rate: a trace that keeps to 2 experts per layer hits at 25%
    resident, one spread over all 8 does not."""
    import numpy as np

    from engine.trace.format import RoutingTrace

    rng = np.random.default_rng(0)
    narrow = RoutingTrace(np.tile(np.array([0, 1]), (64, 32, 1)), 8)
    wide = RoutingTrace(
        np.stack([rng.choice(8, 2, replace=False) for _ in range(64 * 32)]).reshape(64, 32, 2), 8
    )
    req = Request(budget="26%", available=64 * GiB)  # room for the 64 experts the narrow trace uses
    hot = predict(mixtral, profile(), req, routing=narrow)
    cold = predict(mixtral, profile(), req, routing=wide)
    assert hot["hit_rate"]["source"].startswith("the replayed trace")
    assert hot["hit_rate"]["expected"] == pytest.approx(1.0)
    assert cold["hit_rate"]["expected"] < 0.5
    assert hot["decode_tps"] > cold["decode_tps"]
