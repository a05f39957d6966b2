"""RMS error of moeinf's quantisers against llama.cpp's for the same format, on synthetic weights.

For q8_0, q4_0, q4_1 and mxfp4 the yardstick is the ``gguf`` package's quantiser
(``gguf.quants.quantize``, bit-exact with llama.cpp's reference); for q4_k, q5_k and q6_k, which the gguf
package cannot quantise, it is llama.cpp's importance-free reference algorithm restated in
``tests/kquant_yardstick.py``. Prints a Markdown table of ours / llama.cpp's RMS error (below 1: ours
is closer to the weights) for four weight distributions of ``--rows`` x ``--cols`` values.

    .venv/bin/python benchmarks/quantiser_quality.py [--rows 256 --cols 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import kquant_yardstick  # noqa: E402
from test_formats import _rms, _weights  # noqa: E402

from engine import formats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    kinds = ("normal", "heavy", "offset", "uniform")
    print("| format | bits/weight | " + " | ".join(kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for name in formats.QUANTISED:
        f = formats.get(name)
        cells = []
        for kind in kinds:
            x = _weights(kind, (args.rows, args.cols), seed=0)
            ours = _rms(f.unpack(f.pack(x)), x)
            if name in ("q4_k", "q5_k", "q6_k"):
                ref = _rms(getattr(kquant_yardstick, name)(x.numpy()), x)
            else:
                qtype = GGMLQuantizationType(f.ggml_type)
                ref = _rms(dequantize(quantize(x.numpy(), qtype), qtype), x)
            cells.append(f"{ours / ref:.3f}")
        print(f"| {name} | {f.bits_per_weight:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
