"""The CUDA sources compile where nvcc exists, and their dequantisers' arithmetic (run on the host:
this machine may have no GPU) equals the gguf package's reference dequantiser bit for bit in float32."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_blocks import random_blocks, reference

from cuda_ext import loader
from cuda_ext.blocks import BY_TYPE
from cuda_ext.cuda import dequantize

NVCC = loader.nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="no nvcc on PATH: the CUDA sources are not compiled here"
)
HARNESS = Path(__file__).parent / "native" / "dequant_host.cu"


def _arch() -> str:
    """The oldest real architecture this nvcc knows (compiling for it checks the sources everywhere)."""
    listed = subprocess.run([str(NVCC), "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    numbers = sorted(int(a.split("_")[1]) for a in listed.split() if a.startswith("compute_"))
    return f"sm_{numbers[0]}"


def test_the_cuda_sources_compile(tmp_path):
    out = tmp_path / "moeinf_cuda.so"
    result = subprocess.run(
        loader.nvcc_command(_arch(), str(out)), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))  # loads without a GPU: the CUDA runtime is linked in statically
    types = (ctypes.c_int * 16)()
    n = lib.moeinf_cuda_formats(types, 16)
    assert sorted(types[:n]) == sorted(BY_TYPE)


@pytest.fixture(scope="module")
def host_dequant(tmp_path_factory):
    out = tmp_path_factory.mktemp("harness") / "dequant_host.so"
    command = [
        str(NVCC),
        "-O2",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC,-ffp-contract=off",
        "-o",
        str(out),
        str(HARNESS),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.moeinf_host_dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib.moeinf_host_dequant


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"])
def test_dequantisers_equal_the_gguf_reference(host_dequant, name):
    from gguf import GGMLQuantizationType

    qtype = GGMLQuantizationType[name]
    rng = np.random.default_rng(int(qtype))
    values = BY_TYPE[int(qtype)].values
    for n_blocks in (1, 3, 37):
        blocks = random_blocks(int(qtype), n_blocks, rng)
        ref = reference(blocks, int(qtype))
        ours = np.empty(n_blocks * values, dtype=np.float32)
        assert host_dequant(int(qtype), blocks.ctypes.data, ours.ctypes.data, n_blocks) == 0
        np.testing.assert_array_equal(ours, ref)
    # extreme exponents and scales too (subnormal halves, E8M0 0 and 255)
    edge = random_blocks(int(qtype), 4, rng)
    if int(qtype) == 39:
        edge[:, 0] = [0, 1, 254, 255]
    else:
        edge[:, :2] = np.array([1, 0x3FF, 0x7BFF, 0x8001], dtype=np.uint16).reshape(4, 1).view(np.uint8)
    ref = reference(edge, int(qtype))
    ours = np.empty(4 * values, dtype=np.float32)
    host_dequant(int(qtype), edge.ctypes.data, ours.ctypes.data, 4)
    np.testing.assert_array_equal(ours, ref)


def test_dequantize_declines_what_it_cannot_do():
    blocks = torch.zeros(34, dtype=torch.uint8)
    assert dequantize(8, blocks) is None  # on the CPU: the PyTorch path's job
    assert dequantize(99, blocks) is None  # a type the kernel does not know
