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


def moeinf_home() -> Path:
    return Path(os.environ.get("MOEINF_HOME") or Path.home() / ".moeinf").expanduser()


def models_dir() -> Path:
    return moeinf_home() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def traces_dir(name: str) -> Path:
    return moeinf_home() / "traces" / name


def expert_shard_path(model_root: Path, layer: int, expert: int) -> Path:
    return Path(model_root) / "experts" / f"L{layer}" / f"E{expert}.safetensors"
