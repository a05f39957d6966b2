"""The opened model (``engine.store.opened``), the one header reader, the one config reader, the dtype table."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.bench.synthetic import make_synthetic_model
from engine.errors import MoeinfError
from engine.store import dtypes
from engine.store.config import read_config
from engine.store.header import ALIGN, read_header
from engine.store.opened import StoreModel, as_store_model, open_model


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_synthetic_model(
        "opened-test",
        "mixtral",
        num_layers=2,
        num_experts=4,
        top_k=2,
        hidden=64,
        intermediate=96,
        vocab=300,
        dtype=torch.bfloat16,
        root=root,
    )


def test_open_model_records_every_tensor(synth):
    m = open_model(synth)
    assert open_model(m) is m and as_store_model(m) is m
    assert m.name == "opened-test" and m.model_type == "mixtral"
    assert m.layout.num_experts == 4 and m.layout.moe_layers == [0, 1]
    assert m.stored_dtype == torch.bfloat16
    # every dense tensor: its file, format, shape and byte range are those safetensors reads back
    assert m.dense and all(t.file is not None for t in m.dense.values())
    for f in m.dense_files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                info = m.dense[key]
                t = fh.get_tensor(key)
                assert info.file == f and info.shape == tuple(t.shape) and info.torch_dtype == t.dtype
                assert info.format == "bf16" and info.dtype == "BF16"
                raw = f.read_bytes()[info.start : info.end]
                assert info.nbytes == t.numel() * t.element_size()
                assert torch.equal(torch.frombuffer(bytearray(raw), dtype=t.dtype).view(t.shape), t)
    # the expert shards share one header: names, shapes, offsets
    ref = m.expert_tensors
    assert {k: v.shape for k, v in ref.items()} == {
        "gate_proj.weight": (96, 64),
        "up_proj.weight": (96, 64),
        "down_proj.weight": (64, 96),
    }
    for layer in m.layout.moe_layers:
        for e in range(4):
            other = read_header(m.expert_path(layer, e))
            assert other.data_start % ALIGN == 0
            assert {k: (v.start, v.end, v.format) for k, v in other.tensors.items()} == {
                k: (v.start, v.end, v.format) for k, v in ref.items()
            }
    assert m.expert_file_bytes == m.expert_path(0, 0).stat().st_size
    assert m.dense_bytes(torch.float32) == 2 * m.dense_bytes(torch.bfloat16)


def test_format_and_logical_shape_from_metadata(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file(
        {"w": torch.zeros(72, dtype=torch.uint8), "b": torch.ones(4)},
        str(path),
        metadata={"moeinf.formats": json.dumps({"w": {"format": "q4_0", "shape": [4, 32]}})},
    )
    h = read_header(path)
    assert h.tensors["w"].format == "q4_0" and h.tensors["w"].shape == (4, 32)
    assert h.tensors["w"].stored_shape == (72,) and h.tensors["w"].dtype == "U8"
    assert h.tensors["b"].format == "f32" and h.tensors["b"].shape == (4,)
    assert [t.name for t in h.in_data_order()] == sorted(h.tensors, key=lambda n: h.tensors[n].start)


@pytest.mark.parametrize("damage", ["flip_length", "not_json", "missing", "truncated", "empty"])
def test_damaged_store_files_are_one_line_errors(synth, tmp_path, damage):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    dense = sorted((root / "dense").glob("*.safetensors"))[0]
    data = bytearray(dense.read_bytes())
    if damage == "flip_length":
        data[0:8] = struct.pack("<Q", 1 << 40)
    elif damage == "not_json":
        data[8] = 0xFF
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    if damage == "missing":
        dense.unlink()
        other = root / "dense"
        for f in other.glob("*.safetensors"):
            f.unlink()
    else:
        dense.write_bytes(bytes(data))
    with pytest.raises(MoeinfError) as err:
        StoreModel.from_dir(root)
    msg = str(err.value)
    assert "\n" not in msg and "pull" in msg
    if damage != "missing":
        assert str(dense) in msg


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_malformed_config_is_a_one_line_error(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(MoeinfError) as err:
        read_config(tmp_path, hint="fix it")
    assert "config.json" in str(err.value) and str(err.value).endswith("fix it")
    with pytest.raises(MoeinfError, match="config.json is missing"):
        read_config(tmp_path / "nowhere")


def test_malformed_config_field_is_a_one_line_error(synth, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "many"}))
    with pytest.raises(MoeinfError, match="config.json.*num_hidden_layers"):
        _ = StoreModel.from_dir(root).layout


def test_one_dtype_table():
    for name in ("bf16", "BFLOAT16", "torch.bfloat16", torch.bfloat16):
        assert dtypes.parse_dtype(name) == torch.bfloat16
    assert dtypes.parse_dtype("half") == dtypes.parse_dtype("fp16") == torch.float16
    assert dtypes.parse_dtype(None) is None and dtypes.canonical_dtype("fp32") == "float32"
    for bad in ("fp8", torch.float64, "int8"):
        with pytest.raises(MoeinfError, match="unknown dtype .*use bf16, fp16 or fp32"):
            dtypes.parse_dtype(bad)
    for code, dt in (
        ("BF16", torch.bfloat16),
        ("F32", torch.float32),
        ("U8", torch.uint8),
        ("I64", torch.int64),
    ):
        assert dtypes.from_code(code) == dt and dtypes.code_of(dt) == code
    assert dtypes.config_dtype({"torch_dtype": "float16"}) == torch.float16
    assert dtypes.config_dtype({"dtype": "bfloat16", "torch_dtype": "float32"}) == torch.bfloat16
    assert dtypes.config_dtype({}) is None


@pytest.mark.parametrize("budget", [None, "100%", "50%"])
@pytest.mark.parametrize("damage", ["flipped_header", "deleted", "truncated"])
def test_damaged_expert_shard_is_one_error_in_every_budget_mode(synth, tmp_path, budget, damage):
    import shutil

    import engine

    root = tmp_path / "copy"
    shutil.copytree(synth, root)
    shard = root / "experts" / "L1" / "E3.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flipped_header":
        data[9] ^= 0x40  # inside the JSON header
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(bytes(data[: len(data) - 100]))
    else:
        shard.unlink()
    with pytest.raises(MoeinfError) as err:
        with engine.load(
            str(root), expert_budget=budget, policy=None if budget in (None, "100%") else "lru", ctx=256
        ) as s:
            prompt = " ".join(f"w{i}" for i in range(40))  # a prefill this long routes to every expert
            for _ in s.generate(prompt, raw=True, num_predict=1, temperature=0):
                pass
    msg = str(err.value)
    assert "\n" not in msg and str(shard) in msg and "pull" in msg
