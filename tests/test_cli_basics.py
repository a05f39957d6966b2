import os
import subprocess
import sys

from cuda_ext import loader
from engine import __version__


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "moeinf_cli", *args], capture_output=True, text=True, env=env
    )


def test_version_names_the_kernels_in_use():
    r = run_cli("--version")
    assert r.returncode == 0
    version, kernels = r.stdout.strip().splitlines()
    assert version == f"moeinf {__version__}"
    lib = loader.cpu()
    if lib is not None:
        assert kernels.startswith(f"kernels: native CPU ({lib.build} build")
        assert all(name in kernels for name in lib.isa)
    else:
        assert kernels.startswith("kernels: PyTorch")
    off = run_cli("--version", env={**os.environ, "MOEINF_NATIVE_KERNELS": "0"})
    assert off.stdout.strip().splitlines()[1] == "kernels: PyTorch (MOEINF_NATIVE_KERNELS=0)"


def test_help_lists_usage():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "Mixture-of-Experts" in r.stdout
