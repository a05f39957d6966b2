"""Every dtype name moeinf reads or writes, in one table.

* safetensors codes (``"BF16"``, ``"F32"``, ...) <-> torch dtypes: ``SAFETENSORS``, ``code_of``;
* the names users and config.json give a float dtype (``bf16``, ``bfloat16``, ``fp16``, ``half``,
  ``float32``, ``float``, ...): ``parse_dtype`` (user input, a one-line error for anything else),
  ``canonical_dtype`` (the torch name), ``config_dtype`` (a config's ``dtype`` / ``torch_dtype``);
* a tensor's *format* (``format_of_code``): for a plain dtype its lower-case code (``"bf16"``,
  ``"f32"``); a quantised format (``"q4_k"``, ...) is named by the file's metadata instead (see
  ``engine.store.header``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import MoeinfError

if TYPE_CHECKING:  # torch is imported only where a torch dtype is made: `moeinf pull` checks names without it
    import torch

# safetensors code -> torch dtype name
SAFETENSORS: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_CODE_OF = {v: k for k, v in SAFETENSORS.items()}

# the float dtypes moeinf stores and computes in, and every name it accepts for them
FLOAT_NAMES = ("float32", "bfloat16", "float16")
ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}
CHOICES = "bf16, fp16 or fp32 (or bfloat16, float16, float32)"


def _torch(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype`` (``torch.bfloat16`` -> ``"BF16"``)."""
    return _CODE_OF[dtype_name(dtype)]


def from_code(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code; KeyError for a code this torch has no dtype for."""
    name = SAFETENSORS[code]
    import torch

    if not hasattr(torch, name):
        raise KeyError(code)
    return getattr(torch, name)


def format_of_code(code: str) -> str:
    """The tensor format of a plain safetensors dtype: ``"BF16"`` -> ``"bf16"``."""
    return code.lower()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _canonical(name: object) -> str | None:
    """The torch name of the float dtype ``name`` means (a name or a torch dtype), None if none."""
    if name is None:
        return None
    return ALIASES.get(str(name).lower().removeprefix("torch."))


def lookup(name: str | torch.dtype | None) -> torch.dtype | None:
    """The float dtype a name (or torch dtype) means, or None when it names none (no error)."""
    canonical = _canonical(name)
    return _torch(canonical) if canonical else None


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype a user gave (``--dtype``, ``dtype=``) as a torch float dtype; None stays None.

    Anything else is a MoeinfError naming the accepted spellings."""
    canonical = canonical_dtype(name)
    return _torch(canonical) if canonical else None


def canonical_dtype(name: str | torch.dtype | None) -> str | None:
    """``bf16`` -> ``"bfloat16"`` (the torch name); None stays None; MoeinfError for an unknown name.
    Needs no torch (``moeinf pull`` checks ``--dtype`` before it imports torch)."""
    if name is None:
        return None
    canonical = _canonical(name)
    if canonical is None:
        shown = str(name).removeprefix("torch.")
        raise MoeinfError(f"unknown dtype {shown!r}; use {CHOICES}")
    return canonical


def config_dtype(config: dict) -> torch.dtype | None:
    """The float dtype a config.json names (``dtype``, or the older ``torch_dtype``), None if none."""
    return lookup(config.get("dtype") or config.get("torch_dtype"))
