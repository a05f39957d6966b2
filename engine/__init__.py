"""moeinf engine: run Mixture-of-Experts models larger than fast memory.

The library is importable without the command line (``moeinf_cli``); the CLI imports the engine,
never the reverse.
"""

__version__ = "0.1.0"

from engine.errors import MoeinfError  # noqa: E402

__all__ = ["GenerationStats", "MoeinfError", "SamplingParams", "Session", "__version__", "load"]

# The runtime (torch, tokenizers) is imported on first use, so `import engine` stays light.
_LAZY = {
    "load": "engine.runtime.session",
    "Session": "engine.runtime.session",
    "GenerationStats": "engine.runtime.stats",
    "SamplingParams": "engine.runtime.sampling",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
