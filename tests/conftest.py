"""Every test gets its own empty $MOEINF_HOME and never touches the real hub; ``kernels`` runs a test
on each build of the native CPU kernels."""

import os

import pytest
import torch

from cuda_ext import loader

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("moeinf_home")
    monkeypatch.setenv("MOEINF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield home


@pytest.fixture(params=["native", "avx2", "portable"])
def kernels(request, monkeypatch):
    """The kernels as this CPU compiles them, the AVX2 build (where the CPU has AVX2) and the
    auto-vectorised C path (no -march=native)."""
    if loader.cpu() is None:
        pytest.skip("no native kernels (no C compiler, or MOEINF_NATIVE_KERNELS=0)")
    features = loader.cpu_features() or frozenset()
    if request.param == "avx2" and not {"avx2", "fma", "f16c"} <= features:
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    monkeypatch.setenv("MOEINF_NATIVE_KERNELS", request.param)
    loader.reset()
    assert loader.cpu() is not None and loader.cpu().build == request.param
    yield request.param
    monkeypatch.undo()
    loader.reset()
