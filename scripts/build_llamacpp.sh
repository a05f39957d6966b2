#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-quantize (CPU only) from llama-cpp-python's sdist, whose
# vendor/llama.cpp holds llama.cpp's full source (convert_hf_to_gguf.py and gguf-py included).
# Used by benchmarks/vs_llamacpp.py. Nothing is written inside the repo.
#
#   bash scripts/build_llamacpp.sh OUT_DIR [VERSION]
#
# OUT_DIR/src/llama.cpp        the source (convert_hf_to_gguf.py, gguf-py/)
# OUT_DIR/build/bin/           llama-bench, llama-quantize (llama-cli when LLAMACPP_CLI=1)
# OUT_DIR/pydeps/              sentencepiece (convert_hf_to_gguf.py imports it), installed with --target
# The converter needs nothing else: run it with the project's Python (torch, transformers,
# safetensors), the source's own gguf package first on the path:
#   PYTHONPATH=OUT_DIR/src/llama.cpp/gguf-py:OUT_DIR/pydeps python OUT_DIR/src/llama.cpp/convert_hf_to_gguf.py ...
# JOBS (default 2) sets the parallel compile jobs; the compile runs under `nice -n 10`.
set -euo pipefail
out=${1:?usage: build_llamacpp.sh OUT_DIR [llama-cpp-python VERSION]}
version=${2:-0.3.36}
jobs=${JOBS:-2}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ ! -f "$out/src/llama.cpp/CMakeLists.txt" ]; then
    dl=$(mktemp -d)
    "${PY:-python3}" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$dl"
    mkdir -p "$out/src.partial"
    tar xzf "$dl"/llama_cpp_python-*.tar.gz -C "$out/src.partial"
    rm -rf "$out/src"
    mkdir -p "$out/src"
    mv "$out/src.partial"/llama_cpp_python-*/vendor/llama.cpp "$out/src/llama.cpp"
    rm -rf "$out/src.partial" "$dl"
fi
src="$out/src/llama.cpp"

if [ ! -d "$out/pydeps/sentencepiece" ]; then
    "${PY:-python3}" -m pip install -q --no-deps --target "$out/pydeps" sentencepiece
fi

targets=(llama-bench llama-quantize)
if [ "${LLAMACPP_CLI:-0}" = 1 ]; then targets+=(llama-cli); fi

cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF > "$out/cmake.log"
nice -n 10 cmake --build "$out/build" --config Release -j "$jobs" --target "${targets[@]}"
ls -l "$out/build/bin"
