"""moeinf engine: run Mixture-of-Experts models larger than fast memory.

The library is importable without the command line (``moeinf_cli``); the CLI imports the engine,
never the reverse.
"""

__version__ = "0.1.0"

from engine.errors import MoeinfError  # noqa: E402

__all__ = ["MoeinfError", "__version__"]
