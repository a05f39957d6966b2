"""Where things live under ``$MOEINF_HOME`` (default ``~/.moeinf``).

```
models/<name>/manifest.json, config.json, tokenizer*.json, generation_config.json
models/<name>/dense/*.safetensors
models/<name>/experts/L<layer>/E<expert>.safetensors
traces/<name>/...
```
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import MoeinfError


def moeinf_home() -> Path:
    """``$MOEINF_HOME`` (default ``~/.moeinf``); MoeinfError when it names something that is not a directory."""
    home = Path(os.environ.get("MOEINF_HOME") or Path.home() / ".moeinf").expanduser()
    if home.exists() and not home.is_dir():
        raise MoeinfError(f"MOEINF_HOME={home} is not a directory; set MOEINF_HOME to a directory (or remove that file)")
    return home


def models_dir() -> Path:
    return moeinf_home() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def traces_dir(name: str) -> Path:
    return moeinf_home() / "traces" / name


def expert_shard_path(model_root: Path, layer: int, expert: int) -> Path:
    return Path(model_root) / "experts" / f"L{layer}" / f"E{expert}.safetensors"


def missing_shard_error(path: Path | str, hint: str = "pull the model again with `moeinf pull`") -> MoeinfError:
    """The error for an expert shard that is not there: the model was removed while in use (its
    directory is gone: `moeinf rm` during a run) or it is incomplete."""
    root = Path(path).parents[2]  # <model>/experts/L<layer>/E<expert>.safetensors
    if not root.exists():
        return MoeinfError(f"model '{root.name}' was removed from the store while in use (`moeinf rm`); "
                           f"pull it again to use it")
    return MoeinfError(f"missing expert shard {path}: the model is incomplete; {hint}")
