"""Tensor formats: the float dtypes and the block-quantised formats moeinf stores and computes on.

| format | bits/weight | block | layout (bit for bit) |
|---|---|---|---|
| f32, bf16, f16 | 32, 16, 16 | 1 | the tensor's own bytes |
| q8_0 | 8.5 | 32 | GGUF Q8_0 |
| q6_k | 6.5625 | 256 | GGUF Q6_K |
| q5_k | 5.5 | 256 | GGUF Q5_K |
| q4_1 | 5.0 | 32 | GGUF Q4_1 |
| q4_0 | 4.5 | 32 | GGUF Q4_0 |
| q4_k | 4.5 | 256 | GGUF Q4_K |
| mxfp4 | 4.25 | 32 | GGUF MXFP4 (gpt-oss's experts, regrouped losslessly) |

One module per format (``q8_0``, ``q4_0``, ...; the floats in ``floats``), each a ``Format``
(``base``): name, block, bytes per block, GGUF type, ``unpack`` (PyTorch, any device) and ``pack``
(the quantiser). ``QuantTensor`` (``tensor``) is a quantised tensor in memory, ``linear`` computes
on one, ``storage`` says how a quantised tensor sits in a safetensors file.
"""

from __future__ import annotations

from engine.formats import floats, mxfp4, q4_0, q4_1, q4_k, q5_k, q6_k, q8_0
from engine.formats.base import Format

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        floats.F32,
        floats.BF16,
        floats.F16,
        q8_0.FORMAT,
        q6_k.FORMAT,
        q5_k.FORMAT,
        q4_1.FORMAT,
        q4_0.FORMAT,
        q4_k.FORMAT,
        mxfp4.FORMAT,
    )
}
QUANTISED = tuple(name for name, f in FORMATS.items() if f.quantised)
_BY_GGML = {f.ggml_type: f for f in FORMATS.values()}
_BY_DTYPE = {f.torch_dtype: f for f in FORMATS.values() if f.torch_dtype is not None}
_ALIASES = {
    "float32": "f32",
    "fp32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "fp16": "f16",
    "half": "f16",
}

# GGUF types moeinf does not store, and the supported format each is converted to (the nearest at
# or above its precision): GGMLQuantizationType value -> format name.
_GGUF_NEAREST = {
    6: "q6_k",  # Q5_0
    7: "q6_k",  # Q5_1
    9: "q8_0",  # Q8_1
    10: "q4_k",  # Q2_K
    11: "q4_k",  # Q3_K
    15: "q8_0",  # Q8_K
    16: "q4_k",  # IQ2_XXS
    17: "q4_k",  # IQ2_XS
    18: "q4_k",  # IQ3_XXS
    19: "q4_k",  # IQ1_S
    20: "q4_0",  # IQ4_NL
    21: "q4_k",  # IQ3_S
    22: "q4_k",  # IQ2_S
    23: "q4_k",  # IQ4_XS
    28: "f32",  # F64
    29: "q4_k",  # IQ1_M
    34: "q4_k",  # TQ1_0
    35: "q4_k",  # TQ2_0
}


def get(name: str) -> Format:
    """The format called ``name`` (also accepts torch dtype names); ValueError naming the choices."""
    key = _ALIASES.get(str(name).lower().removeprefix("torch."), str(name).lower())
    if key not in FORMATS:
        raise ValueError(f"unknown tensor format {name!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[key]


def of_dtype(dtype) -> Format:
    """The float format of a torch dtype (f32, bf16, f16)."""
    if dtype not in _BY_DTYPE:
        raise ValueError(f"no tensor format for {dtype}")
    return _BY_DTYPE[dtype]


def of_ggml_type(ggml_type: int) -> Format | None:
    """The format that holds GGUF type ``ggml_type`` bit for bit, or None."""
    return _BY_GGML.get(int(ggml_type))


def nearest_for_ggml_type(ggml_type: int) -> Format:
    """The format a GGUF tensor of ``ggml_type`` is stored in: its own, or the nearest supported one."""
    own = of_ggml_type(ggml_type)
    if own is not None:
        return own
    return FORMATS[_GGUF_NEAREST.get(int(ggml_type), "q8_0")]


__all__ = ["FORMATS", "QUANTISED", "Format", "get", "nearest_for_ggml_type", "of_dtype", "of_ggml_type"]
