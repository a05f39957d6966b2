"""Pulling tiny checkpoints of every family, in both layouts, from a local directory.

The oracle is transformers itself: the store's dense tensors must equal the loaded model's
state_dict entries of the same name, and every expert shard must equal that expert's slice of the
model's fused expert parameters (gpt-oss: de-interleaved and transposed).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import MOE_FAMILIES, TINY_FAMILIES, load_reference, make_tiny_checkpoint

from engine.store.families import moe_layout
from engine.store.header import read_header
from engine.store.manifest import read_manifest, resolve_model
from engine.store.paths import expert_shard_path
from engine.store.pull import pull_model
from engine.store.verify import verify_model

LAYOUTS = ("per_expert", "fused")


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def _ckpt(root, family, layout, **kw):
    d = root / f"{family}-{layout}" if not kw else root / f"{family}-{layout}-{abs(hash(str(kw)))}"
    if not (d / "config.json").exists():
        make_tiny_checkpoint(family, d, layout=layout, **kw)
    return d


def expected_from_transformers(ckpt_dir):
    """(dense tensors by name, expert tensors by (layer, expert)) as transformers holds them in memory."""
    model = load_reference(ckpt_dir)
    family = model.config.model_type
    dense, experts = {}, {}
    for name, t in model.state_dict().items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$", name)
        if not m:
            dense[name] = t
            continue
        layer, which, bias = int(m.group(1)), m.group(2), bool(m.group(3))
        for e in range(t.shape[0]):
            d = experts.setdefault((layer, e), {})
            x = t[e]
            if family == "gpt_oss":
                if which == "gate_up_proj" and bias:
                    d["gate_proj.bias"], d["up_proj.bias"] = x[0::2], x[1::2]
                elif which == "gate_up_proj":
                    d["gate_proj.weight"], d["up_proj.weight"] = x[:, 0::2].T, x[:, 1::2].T
                elif bias:
                    d["down_proj.bias"] = x
                else:
                    d["down_proj.weight"] = x.T
            elif which == "gate_up_proj":
                half = x.shape[0] // 2
                d["gate_proj.weight"], d["up_proj.weight"] = x[:half], x[half:]
            else:
                d["down_proj.weight"] = x
    return dense, experts


def store_dense(root):
    out = {}
    for f in sorted((root / "dense").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pull_matches_transformers_tensor_by_tensor(ckpt_root, family, layout):
    src = _ckpt(ckpt_root, family, layout)
    result = pull_model(str(src), name=f"{family}-{layout}")
    root = result.path
    assert root == resolve_model(f"{family}-{layout}")
    dense, experts = expected_from_transformers(src)

    got_dense = store_dense(root)
    assert sorted(got_dense) == sorted(dense)
    for name, t in dense.items():
        assert torch.equal(got_dense[name], t), name

    layout_info = moe_layout(json.loads((src / "config.json").read_text()))
    shards = sorted((root / "experts").rglob("*.safetensors")) if (root / "experts").exists() else []
    expect_keys = {(layer, e) for layer in layout_info.moe_layers for e in range(layout_info.num_experts)}
    assert set(experts) == expect_keys
    assert len(shards) == len(expect_keys)  # one shard per (layer, expert), nothing else
    for (layer, e), want in experts.items():
        path = expert_shard_path(root, layer, e)
        got = load_file(str(path))
        assert sorted(got) == sorted(want), path
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{path}:{k}"
        header = read_header(path)
        assert header.data_start % 4096 == 0, path
        # the data section is gate, up, down (then biases), back to back
        order = [t.name for t in header.in_data_order()]
        assert order[:3] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]

    m = read_manifest(root)
    assert m["family"] == family and m["format_version"] == 1
    assert m["num_layers"] == layout_info.num_layers and m["moe_layers"] == layout_info.moe_layers
    assert m["num_experts"] == layout_info.num_experts and m["top_k"] == layout_info.top_k
    assert m["source"] == {"kind": "local", "path": str(src.resolve())}
    assert m["dtype"] == "float32" and m["dequantized"] is None
    assert m["dense_bytes"] == sum(v["size"] for k, v in m["files"].items() if k.startswith("dense/"))
    assert m["total_bytes"] == sum(v["size"] for v in m["files"].values())
    if layout_info.is_moe:
        assert m["expert_bytes"] == expert_shard_path(root, layout_info.moe_layers[0], 0).stat().st_size
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert f in m["files"] and (root / f).is_file()
    assert verify_model(root).ok
    assert not list(root.parent.glob(".partial-*"))


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "gpt_oss"])
def test_both_layouts_give_byte_identical_expert_shards(ckpt_root, family):
    a = pull_model(str(_ckpt(ckpt_root, family, "per_expert")), name="a").manifest["files"]
    b = pull_model(str(_ckpt(ckpt_root, family, "fused")), name="b").manifest["files"]
    experts = [k for k in a if k.startswith("experts/")]
    assert experts and experts == [k for k in b if k.startswith("experts/")]
    assert all(a[k]["sha256"] == b[k]["sha256"] for k in experts)


@pytest.mark.parametrize(("family", "layout"), [("mixtral", "per_expert"), ("qwen2_moe", "fused"), ("gpt_oss", "fused")])
def test_multi_shard_checkpoint_streams_shard_by_shard(ckpt_root, family, layout):
    """Experts whose matrices straddle source shards are assembled; dense parts follow the source shards."""
    sharded = _ckpt(ckpt_root, family, layout, max_shard_size="150KB")
    n_src = len(list(sharded.glob("model-*.safetensors")))
    assert n_src >= 3
    one = pull_model(str(_ckpt(ckpt_root, family, layout)), name="one").manifest["files"]
    many = pull_model(str(sharded), name="many")
    files = many.manifest["files"]
    assert {k: v["sha256"] for k, v in files.items() if k.startswith("experts/")} == {
        k: v["sha256"] for k, v in one.items() if k.startswith("experts/")
    }
    parts = [k for k in files if k.startswith("dense/")]
    assert 1 < len(parts) <= n_src
    dense_one = store_dense(resolve_model("one"))
    dense_many = store_dense(many.path)
    assert sorted(dense_one) == sorted(dense_many)
    assert all(torch.equal(dense_one[k], dense_many[k]) for k in dense_one)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_conversion(ckpt_root, dtype, torch_dtype):
    src = _ckpt(ckpt_root, "deepseek_v3", "fused")
    r = pull_model(str(src), name="v3", dtype=dtype)
    dense, experts = expected_from_transformers(src)
    got = store_dense(r.path)
    for name, t in dense.items():
        if name.endswith("e_score_correction_bias"):  # kept in float32, as transformers keeps it
            assert got[name].dtype == torch.float32 and torch.equal(got[name], t)
        else:
            assert got[name].dtype == torch_dtype and torch.equal(got[name], t.to(torch_dtype)), name
    for (layer, e), want in experts.items():
        shard = load_file(str(expert_shard_path(r.path, layer, e)))
        for k, v in want.items():
            assert shard[k].dtype == torch_dtype and torch.equal(shard[k], v.to(torch_dtype))
    m = r.manifest
    assert m["dtype"] == str(torch_dtype).removeprefix("torch.") and m["source_dtype"] == "float32"
    assert json.loads((r.path / "config.json").read_text())["dtype"] == m["dtype"]
    # an fp16/bf16 expert is half the fp32 one (plus the 4 KiB-aligned header)
    with safe_open(str(expert_shard_path(r.path, 1, 0)), "pt") as f:
        assert f.get_tensor("gate_proj.weight").dtype == torch_dtype


def test_repull_same_source_is_up_to_date_and_new_options_rebuild(ckpt_root):
    src = _ckpt(ckpt_root, "olmoe", "fused")
    first = pull_model(str(src), name="o")
    again = pull_model(str(src), name="o")
    assert again.up_to_date and again.manifest["created"] == first.manifest["created"]
    other = pull_model(str(src), name="o", dtype="bf16")
    assert not other.up_to_date and other.manifest["dtype"] == "bfloat16"
    assert read_manifest(resolve_model("o"))["dtype"] == "bfloat16"
