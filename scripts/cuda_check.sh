#!/usr/bin/env bash
# The CUDA check for a lent GPU machine (the device tool; its python3 holds a CUDA PyTorch and
# transformers, but not every package moeinf needs). Two steps:
#
#   here, once:  bash scripts/cuda_check.sh --wheels      # the missing packages as wheels into .whl/ (git-ignored)
#   there:       run(command="bash scripts/cuda_check.sh", carry=[".whl"], timeout_s=540)
#
# There it installs the carried wheels into /tmp/site, builds and tests the CUDA kernels
# (tests/test_cuda_ext_cuda.py, the CUDA unpack tests), then runs scripts/cuda_check.py (fidelity of
# every family on CUDA against the CPU engine, offloaded against all-resident on CUDA in bf16 and q4_k,
# a short bench); everything lands in $OUT (logs and cuda_check.json). Exit status: the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="gguf==0.17.1 prompt_toolkit==3.0.52 wcwidth==0.2.14 pexpect==4.9.0 ptyprocess==0.7.0"
if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $WHEELS
    exit $?
fi
OUT=${OUT:-/tmp/cuda-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOEINF_HOME=/tmp/moeinf-cuda-check
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 10
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
failed=0
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$OUT/machine.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider --basetemp=/tmp/bt-cuda tests/test_cuda_ext_cuda.py \
    tests/test_formats.py -k "cuda" 2>&1 | tee "$OUT/tests.log" || failed=$((failed + 1))
timeout 300 python3 scripts/cuda_check.py --out "$OUT" 2>&1 | tee "$OUT/cuda_check.log" || failed=$((failed + 1))
exit $failed
