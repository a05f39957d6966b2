import subprocess
import sys

from engine import __version__


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moeinf_cli", *args], capture_output=True, text=True)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"moeinf {__version__}"


def test_help_lists_usage():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "Mixture-of-Experts" in r.stdout
