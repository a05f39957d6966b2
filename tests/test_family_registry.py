"""Adding a family is one module: a family declared only in this file pulls, builds and runs.

``tiny_moe`` is a made-up family with Mixtral's math but its own checkpoint vocabulary: its MoE block
is called ``moe``, its router ``router``, its config counts experts in ``n_experts``, and its experts
are fused in a layout no real family uses (``gate_up_proj`` [E, H, 2I], gate columns then up columns;
``down_proj`` [E, I, H]). Its checkpoint is a tiny Mixtral checkpoint rewritten into that
vocabulary, so the oracle is the Mixtral model of the same weights (itself checked against
transformers by the fidelity tests): same logits, same greedy tokens, resident or offloaded with
speculative hints. Nothing outside this file knows the family.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_checkpoint

import engine
from engine.errors import MoeinfError
from engine.model.loader import load_model
from engine.store.families import (
    Family,
    SyntheticRecipe,
    get_family,
    moe_layout,
    register,
    strip_model_prefix,
    supported_model_types,
    unregister,
)
from engine.store.pull import pull_model

# ---- the family: everything moeinf needs to know about tiny_moe ------------------------------------


def split_fused(which, bias, t, inter):
    for e in range(t.shape[0]):
        if which == "gate_up_proj":  # [H, 2I]: gate columns, then up columns
            yield e, "gate_proj.weight", t[e][:, :inter].t().contiguous()
            yield e, "up_proj.weight", t[e][:, inter:].t().contiguous()
        else:  # [I, H]
            yield e, "down_proj.weight", t[e].t().contiguous()


def rename(name):
    return (strip_model_prefix(name) or name).replace(".mlp.router.", ".mlp.gate.")


def build(args, experts):
    from engine.model.layers.attention import Attention
    from engine.model.layers.moe import MoEBlock, swiglu_expert
    from engine.model.layers.rope import RotaryEmbedding
    from engine.model.layers.router import SoftmaxTopKRouter
    from engine.model.transformer import CausalLM, DecoderLayer

    layout = TINY_MOE.moe_layout(args.config)
    layers = []
    for i in range(args.num_layers):
        attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim)
        gate = SoftmaxTopKRouter(
            args.hidden_size, layout.num_experts, layout.top_k, renormalize=True, weights_dtype="float32"
        )
        mlp = MoEBlock(i, gate, experts, swiglu_expert(args.hidden_act))
        layers.append(DecoderLayer(attn, mlp, args.hidden_size, args.rms_norm_eps))
    return CausalLM(args, layers, RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings))


TINY_MOE = Family(
    "tiny_moe",
    build,
    config_defaults={"rms_norm_eps": 1e-5},
    rope_theta=1e6,
    expert_count=("n_experts",),
    expert_size=("intermediate_size",),
    moe_module="moe",
    split_fused=split_fused,
    router="router",
    rename=rename,
    synthetic=SyntheticRecipe(lambda s: {"n_experts": s.num_experts, "intermediate_size": s.intermediate}),
)


@pytest.fixture
def tiny_moe():
    register(TINY_MOE)
    yield TINY_MOE
    unregister("tiny_moe")


def rewrite_as_tiny_moe(mixtral_dir, out):
    """The Mixtral checkpoint's weights in tiny_moe's names and fused layout."""
    shutil.copytree(mixtral_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "tiny_moe"
    config["n_experts"] = config.pop("num_local_experts")
    config.pop("architectures", None)
    (out / "config.json").write_text(json.dumps(config))
    src = load_file(str(out / "model.safetensors"))
    per_expert = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
    tensors, experts = {}, {}
    for name, t in src.items():
        m = per_expert.match(name)
        if m:
            experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            tensors[name.replace(".block_sparse_moe.gate.", ".moe.router.")] = t
    for layer, by_expert in experts.items():
        ids = sorted(by_expert)
        gate_up = [torch.cat([by_expert[e]["w1"].t(), by_expert[e]["w3"].t()], dim=1) for e in ids]
        tensors[f"model.layers.{layer}.moe.experts.gate_up_proj"] = torch.stack(gate_up).contiguous()
        tensors[f"model.layers.{layer}.moe.experts.down_proj"] = torch.stack(
            [by_expert[e]["w2"].t() for e in ids]
        ).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    mixtral = make_tiny_checkpoint("mixtral", root / "mixtral")
    return mixtral, rewrite_as_tiny_moe(mixtral, root / "tiny_moe")


def test_a_family_declared_in_one_file_pulls_builds_and_runs(tiny_moe, checkpoints):
    mixtral_src, tiny_src = checkpoints
    ref_root = pull_model(str(mixtral_src), name="ref-mixtral").path
    root = pull_model(str(tiny_src), name="tiny").path
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["family"] == "tiny_moe" and manifest["num_experts"] == 8
    assert (root / "experts" / "L1" / "E7.safetensors").is_file()

    tokens = torch.tensor([0, 9, 33, 120, 7, 250, 3, 18])
    want = load_model(ref_root, max_seq_len=32).forward(tokens, 0)
    got = load_model(root, max_seq_len=32).forward(tokens, 0)
    assert torch.equal(got, want)

    def reply(name, **kw):
        s = engine.load(name, ctx=64, **kw)
        text = "".join(
            p for p in s.generate("Why is the sky blue?", temperature=0, num_predict=12) if isinstance(p, str)
        )
        return text, s

    expected, _ = reply("ref-mixtral")
    assert reply("tiny")[0] == expected
    offloaded, s = reply("tiny", expert_budget="25%")  # the default policy reads its routers for hints
    assert offloaded == expected and s.experts.hints


def test_synthetic_model_of_a_new_family(tiny_moe):
    from engine.bench.synthetic import make_synthetic_model
    from engine.memory.hints import RouterHints
    from engine.store.opened import as_store_model

    root = make_synthetic_model(
        "syn-tiny",
        "tiny_moe",
        num_layers=2,
        num_experts=4,
        top_k=2,
        hidden=64,
        intermediate=96,
        vocab=300,
        head_dim=16,
    )
    config = json.loads((root / "config.json").read_text())
    assert moe_layout(config).num_experts == 4
    logits = load_model(root, max_seq_len=16).forward(torch.tensor([1, 10, 20]), 0)
    assert logits.shape == (3, 300) and torch.isfinite(logits).all()
    hints = RouterHints(as_store_model(root).dense, [0, 1], tiny_moe)
    assert hints.next_layer(0) == 1 and len(hints.scores(1, torch.randn(64))) == 4


def test_unknown_model_type_is_refused_with_the_list():
    config = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 8, "num_local_experts": 4}
    for ask in (lambda: get_family("bert"), lambda: moe_layout(config)):
        with pytest.raises(MoeinfError) as e:
            ask()
        msg = str(e.value)
        assert "\n" not in msg and "unsupported model family 'bert'" in msg
        assert all(f in msg for f in supported_model_types())
    assert "tiny_moe" not in supported_model_types()  # registered only by the fixture


def test_every_shipped_family_is_registered_and_a_name_once():
    assert set(supported_model_types()) >= {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "llama",
    }
    with pytest.raises(ValueError):
        register(Family("mixtral", build))


def test_asking_a_family_for_its_names_loads_no_model_code():
    """The store's questions (layout, checkpoint names) import the family modules, not their layers."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from engine.store.families import families, moe_layout\n"
        "assert moe_layout({'model_type': 'mixtral', 'num_hidden_layers': 2, 'hidden_size': 8,"
        " 'num_local_experts': 4, 'num_experts_per_tok': 2, 'intermediate_size': 16}).num_experts == 4\n"
        "assert len(families()) >= 8\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('engine.model.layers', 'engine.model.transformer',"
        " 'engine.model.loader', 'cuda_ext')))\n"
        "print(heavy or 'ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-2000:]
