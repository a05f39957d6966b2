"""The decode step's small native ops (cuda_ext/csrc/cpu/decode.c) against the PyTorch path they replace:
RMSNorm of one bf16 row, and the softmax top-k router of one bf16 token."""

from __future__ import annotations

import pytest
import torch

from cuda_ext import cpu, loader
from engine.model.layers.norm import RMSNorm
from engine.model.layers.router import SoftmaxTopKRouter

pytestmark = pytest.mark.skipif(loader.cpu() is None, reason="no C compiler for the native kernels")


def _torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("hidden", [64, 333, 896, 2048])
def test_rms_norm_matches_torch(hidden):
    torch.manual_seed(hidden)
    diffs = 0
    for t in range(40):
        x = (torch.randn(1, hidden) * (0.05 + t)).bfloat16()
        w = (1 + 0.1 * torch.randn(hidden)).bfloat16()
        got = cpu.rms_norm(x, w, 1e-6)
        want = _torch_norm(x, w, 1e-6)
        # the float32 mean is summed in another order than torch's: at most one bf16 ulp, rarely
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=0)
        diffs += int(not torch.equal(got, want))
    assert diffs <= 2


def test_rms_norm_module_takes_the_native_path_for_one_token():
    norm = RMSNorm(256, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x = torch.randn(1, 256).bfloat16()
    assert torch.allclose(norm(x).float(), _torch_norm(x, norm.weight, 1e-5).float(), rtol=2**-7, atol=0)
    two = torch.randn(2, 256).bfloat16()  # several rows: the PyTorch path, exactly
    assert torch.equal(norm(two), _torch_norm(two, norm.weight, 1e-5))


def _torch_route(x, router):
    logits = cpu.linear(x, router.weight, router.bias)
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, router.top_k, dim=-1)
    if router.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return (w.to(logits.dtype) if router.weights_dtype == "input" else w), ids, probs


@pytest.mark.parametrize(
    "experts,hidden,k,renorm,wdtype,bias",
    [(8, 1024, 2, False, "float32", False), (64, 512, 8, False, "input", False),
     (128, 256, 8, True, "input", False), (256, 384, 8, True, "float32", True), (32, 64, 4, True, "input", True)],
)
def test_router_matches_torch(experts, hidden, k, renorm, wdtype, bias):
    torch.manual_seed(experts + k)
    router = SoftmaxTopKRouter(hidden, experts, k, renormalize=renorm, weights_dtype=wdtype, bias=bias)
    with torch.no_grad():
        router.weight.normal_(0, 2 / hidden**0.5)
        if bias:
            router.bias.normal_(0, 0.5)
    router = router.bfloat16()
    for _ in range(30):
        x = torch.randn(1, hidden).bfloat16()
        w, ids = router(x)
        assert ids.dtype == torch.int64 and ids.shape == (1, k) and w.shape == (1, k)
        assert w.dtype == (torch.bfloat16 if wdtype == "input" else torch.float32)
        want_w, want_ids, probs = _torch_route(x, router)
        # the same probabilities chosen; exactly tied experts may be chosen in another order or another one
        assert torch.equal(probs[0, ids[0]], probs[0, want_ids[0]])
        p = probs[0, ids[0]]
        assert bool((p[:-1] >= p[1:]).all())  # descending
        assert len(set(ids[0].tolist())) == k
        if torch.equal(ids, want_ids):
            assert torch.allclose(w.float(), want_w.float(), rtol=2e-6 if wdtype == "float32" else 2**-8, atol=0)
        if renorm:
            assert abs(w.float().sum().item() - 1) < 1e-2


@pytest.mark.parametrize("experts,hidden,k,renorm,bias", [(8, 1024, 2, False, False), (128, 256, 8, True, True), (60, 72, 4, True, False)])
def test_float32_router_matches_torch(experts, hidden, k, renorm, bias):
    """A float32 model's router (a GGUF's float32 ffn_gate_inp) in one native call: the experts torch picks
    (where no two are within the float32 sums' order of each other) and its weights to float32 rounding."""
    torch.manual_seed(experts + hidden)
    router = SoftmaxTopKRouter(hidden, experts, k, renormalize=renorm, weights_dtype="input", bias=bias)
    with torch.no_grad():
        router.weight.normal_(0, 2 / hidden**0.5)
        if bias:
            router.bias.normal_(0, 0.5)
    for _ in range(30):
        x = torch.randn(1, hidden)
        routed = cpu.route_topk_f32(x, router.weight, router.bias, k, renorm)
        assert routed is not None
        w, ids = router(x)
        assert torch.equal(w, routed[0]) and torch.equal(ids, routed[1])  # the module takes the native call
        assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (1, k)
        want_w, want_ids, probs = _torch_route(x, router)
        top = probs[0].sort(descending=True).values
        if (top[: k + 1].diff().abs() > 1e-5).all():  # no near-tie among the first k + 1
            assert torch.equal(ids, want_ids)
            assert torch.allclose(w, want_w, rtol=1e-5, atol=1e-7)
    assert cpu.route_topk_f32(x.bfloat16(), router.weight, router.bias, k, renorm) is None


def test_router_tie_takes_the_lower_id():
    router = SoftmaxTopKRouter(16, 6, 2, renormalize=False).bfloat16()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[[1, 4], 0] = 1.0
    w, ids = router(torch.ones(1, 16).bfloat16())
    assert ids.tolist() == [[1, 4]]
    assert w[0, 0] == w[0, 1]


@pytest.mark.parametrize("experts,groups,topk_group,k,renorm", [(256, 8, 4, 8, True), (16, 4, 2, 3, False), (64, 1, 1, 6, True)])
def test_deepseek_v3_router_matches_torch(experts, groups, topk_group, k, renorm):
    from engine.model.families.deepseek.router import DeepseekV3Router

    torch.manual_seed(experts)
    hidden = 448
    router = DeepseekV3Router(hidden, experts, k, n_group=groups, topk_group=topk_group, norm_topk_prob=renorm,
                              routed_scaling_factor=2.5)
    with torch.no_grad():
        router.weight.normal_(0, 2 / hidden**0.5)
        router.e_score_correction_bias.normal_(0, 0.1)
    router = router.bfloat16()
    assert router.e_score_correction_bias.dtype == torch.float32
    for _ in range(25):
        x = torch.randn(1, hidden).bfloat16()
        w, ids = router(x)  # the native call
        assert w.dtype == torch.float32 and ids.shape == (1, k)
        native = cpu._native
        cpu._native = lambda: None  # the PyTorch path of the same module
        try:
            want_w, want_ids = router(x)
        finally:
            cpu._native = native
        order = torch.argsort(want_ids[0])  # torch's top-k is unsorted: compare as sets of (id, weight)
        mine = torch.argsort(ids[0])
        assert torch.equal(ids[0][mine], want_ids[0][order])
        assert torch.allclose(w[0][mine], want_w[0][order], rtol=1e-5, atol=1e-7)


def test_gpt_oss_norm_and_router_match_torch():
    """The norm as the module's PyTorch path computes it; the router's top k of the bf16 logits (the native
    linear's, as close to F.linear's as bf16 rounds) and their softmax rounded to bf16, as torch.softmax does."""
    from engine.model.families.gpt_oss.experts import GptOssRouter
    from engine.model.families.gpt_oss.model import GptOssRMSNorm

    torch.manual_seed(3)
    norm = GptOssRMSNorm(384, 1e-5).bfloat16()
    router = GptOssRouter(384, 32, 4).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        router.weight.normal_(0, 2 / 384**0.5)
        router.bias.normal_(0, 0.3)
    native = cpu._native
    for _ in range(30):
        x = torch.randn(1, 384).bfloat16()
        got_n, (got_w, got_ids) = norm(x), router(x)
        cpu._native = lambda: None  # the norm's PyTorch path
        try:
            want_n = norm(x)
        finally:
            cpu._native = native
        assert torch.allclose(got_n.float(), want_n.float(), rtol=2**-7, atol=0)
        logits = cpu.linear(x, router.weight, router.bias)[0]
        reference = torch.nn.functional.linear(x, router.weight, router.bias)[0]
        assert torch.allclose(logits.float(), reference.float(), rtol=2**-7, atol=2**-5)
        top, want_ids = torch.topk(logits, 4)
        assert got_w.dtype == torch.float32 and got_ids.shape == (1, 4)
        assert torch.equal(logits[got_ids[0]], top)  # the same logits (exact ties may swap ids)
        want_w = torch.softmax(logits[got_ids[0]], dim=-1, dtype=torch.bfloat16).float()
        assert torch.equal(got_w[0], want_w)


def test_float32_rms_norm_matches_torch():
    torch.manual_seed(7)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    for t in range(30):
        x = torch.randn(1, 576) * (0.1 + t)
        got = norm(x)  # one float32 row: the native call
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        want = norm.weight * h
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-6, atol=0)  # float32 roundings of the mean in another order


def test_route_v3_split_over_threads_gives_the_same_routing():
    """The native step's V3 router splits the logits' rows over the pool: the same ids and weights."""
    lib = loader.cpu().lib
    torch.manual_seed(3)
    E, H, k = 256, 448, 8
    x = torch.randn(1, H).bfloat16()
    W = (torch.randn(E, H) * H**-0.5).bfloat16()
    corr = torch.randn(E) * 0.01
    got = []
    for nt in (1, 2, 3):
        ids, w = torch.empty(k, dtype=torch.int64), torch.empty(k)
        err = lib.moeinf_route_v3_mt(x.data_ptr(), W.data_ptr(), corr.data_ptr(), E, H, k, 8, 4, 1, 2.5,
                                     ids.data_ptr(), w.data_ptr(), nt)
        assert err == 0
        got.append((ids, w))
    want = cpu.route_v3(x, W, corr, k, 8, 4, True, 2.5)
    for ids, w in got:
        assert torch.equal(ids, want[1][0]) and torch.equal(w, want[0][0])
