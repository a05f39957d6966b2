"""Model aliases and Hugging Face hub downloads (through huggingface_hub, so HF_TOKEN, HF_HOME,
HF_ENDPOINT and HF_HUB_OFFLINE work as users expect).

Only the files a pull needs are fetched: config, tokenizer and generation files with one
``snapshot_download(allow_patterns=...)`` (which also pins the revision to a commit), then the
safetensors shards named by ``model.safetensors.index.json`` (or the single ``model.safetensors``)
one at a time, so conversion can start on shard 1 while the rest is still on the hub. Shards a pull
downloaded are deleted from the hub cache once converted (unless kept), so the extra disk is about
one source shard.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.errors import MoeinfError

ALIASES: dict[str, str] = {
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "mixtral-8x22b": "mistralai/Mixtral-8x22B-v0.1",
    "mixtral-8x22b-instruct": "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v2-lite-chat": "deepseek-ai/DeepSeek-V2-Lite-Chat",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "qwen1.5-moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen1.5-moe-chat": "Qwen/Qwen1.5-MoE-A2.7B-Chat",
    "qwen2-57b-a14b": "Qwen/Qwen2-57B-A14B-Instruct",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "olmoe": "allenai/OLMoE-1B-7B-0924",
    "olmoe-instruct": "allenai/OLMoE-1B-7B-0924-Instruct",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}

META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "model.safetensors.index.json",
    "LICENSE",
    "LICENSE.md",
    "LICENSE.txt",
)
SINGLE_SHARD = "model.safetensors"


def resolve_alias(name: str) -> str | None:
    """The hub repo of an alias (case-insensitive; ``qwen3:30b-a3b`` = ``qwen3-30b-a3b``), or None."""
    key = name.lower()
    return ALIASES.get(key) or ALIASES.get(key.replace(":", "-"))


def unknown_alias_error(name: str) -> MoeinfError:
    low = name.lower()
    close = [a for a in ALIASES if a.startswith(low)][:3] or difflib.get_close_matches(low, list(ALIASES), n=3,
                                                                                      cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return MoeinfError(
        f"unknown model {name!r}; {hint}give an alias (`moeinf pull --list-aliases`), a hub repo like "
        "org/name, or a checkpoint directory"
    )


def shard_names(meta_dir: Path) -> list[str]:
    """Safetensors shards of a checkpoint in processing order: from the index, else ``model.safetensors``."""
    index = meta_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return sorted(set(weight_map.values()))
    return [SINGLE_SHARD]


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub exceptions into one-line MoeinfErrors naming the fix."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.GatedRepoError:
        raise MoeinfError(
            f"{repo} is gated: accept its license on the hub page, then set HF_TOKEN to a token of that account "
            "(or run `hf auth login`)"
        ) from None
    except e.RepositoryNotFoundError:
        raise MoeinfError(
            f"repository {repo} not found on {_endpoint()}; check the name (or set HF_TOKEN if it is private)"
        ) from None
    except e.RevisionNotFoundError:
        raise MoeinfError(f"revision {revision!r} not found in {repo}; give a branch, tag or commit that exists") from None
    except e.RemoteEntryNotFoundError as err:
        if SINGLE_SHARD in str(err):
            raise MoeinfError(
                f"{repo} has no model.safetensors (nor model.safetensors.index.json); moeinf converts safetensors "
                "checkpoints only"
            ) from None
        raise MoeinfError(f"{repo} lacks a file the pull needs ({_first_line(err)}); it is not a complete checkpoint") from None
    except e.HfHubHTTPError as err:
        raise MoeinfError(f"the hub answered an error for {repo}: {_first_line(err)}") from None
    except Exception as err:
        if not isinstance(err, e.LocalEntryNotFoundError | e.OfflineModeIsEnabled) and not _is_network_error(err):
            raise
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise MoeinfError(
                f"HF_HUB_OFFLINE is set and {repo} is not (fully) in the Hugging Face cache; unset HF_HUB_OFFLINE "
                "to download it"
            ) from None
        raise MoeinfError(
            f"cannot reach the hub at {_endpoint()} and {repo} is not in the Hugging Face cache; check the network "
            "(or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use cached files only"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_network_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "TimeoutException", "Timeout", "ConnectTimeout", "NetworkError",
                     "TransportError", "RemoteProtocolError"})


def _tqdm_for(on_progress: Callable[[str, int, int | None], None] | None):
    """A tqdm class that reports byte progress to ``on_progress(desc, n, total)`` instead of drawing."""
    if on_progress is None:
        return None
    from tqdm.auto import tqdm

    class _Reporter(tqdm):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            self._desc = kwargs.get("desc") or ""
            self._total_bytes = kwargs.get("total")
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                on_progress(self._desc, int(n), self._total_bytes)
            return super().update(n)

    return _Reporter


def _ignore(desc: str, n: int, total: int | None) -> None:
    return None


class HubSource:
    """A hub repo at a revision: meta files via ``snapshot_download``, shards one by one via ``hf_hub_download``."""

    def __init__(self, repo: str, revision: str | None = None, keep_downloads: bool = False,
                 on_download: Callable[[str, int, int | None], None] | None = None):
        self.repo = repo
        self.revision = revision
        self.keep_downloads = keep_downloads
        self.on_download = on_download
        self._downloaded: set[str] = set()
        with hub_errors(repo, revision):
            from huggingface_hub import snapshot_download

            self.meta_dir = Path(
                snapshot_download(repo, revision=revision, allow_patterns=list(META_FILES), tqdm_class=_tqdm_for(_ignore))
            )
        self.commit = self.meta_dir.name
        if not (self.meta_dir / "config.json").is_file():
            raise MoeinfError(f"{repo} has no config.json; it is not a Hugging Face model checkpoint")
        self.shards = shard_names(self.meta_dir)

    def describe(self) -> dict:
        return {"kind": "hub", "repo": self.repo, "revision": self.revision or "main", "commit": self.commit}

    def shard_sizes(self) -> dict[str, int] | None:
        """Sizes of the shards from the hub (None when offline or unknown)."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        try:
            infos = HfApi().get_paths_info(self.repo, self.shards, revision=self.commit)
        except Exception:  # sizes only feed the disk-space estimate and the progress bar
            return None
        return {i.path: int(getattr(i, "size", 0) or 0) for i in infos}

    def fetch(self, shard: str) -> Path:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo, shard, revision=self.commit)
        with hub_errors(self.repo, self.revision):
            path = Path(hf_hub_download(self.repo, shard, revision=self.commit, tqdm_class=_tqdm_for(self.on_download)))
        if not isinstance(cached, str):
            self._downloaded.add(shard)
        return path

    def release(self, shard: str) -> None:
        """Delete a converted shard from the hub cache if this pull downloaded it."""
        if self.keep_downloads or shard not in self._downloaded:
            return
        self.forget(shard)

    def forget(self, shard: str) -> None:
        """Remove a cached shard (link and blob), e.g. because it turned out corrupt."""
        link = self.meta_dir / shard
        try:
            blob = link.resolve()
            link.unlink(missing_ok=True)
            if blob != link and blob.is_file():
                blob.unlink()
        except OSError:
            pass

    def corrupt_hint(self, shard: str) -> str:
        self.forget(shard)
        return "it was removed from the Hugging Face cache; run the pull again to download it afresh"


class LocalSource:
    """A checkpoint directory on disk (also the temporary one a GGUF file or an upcycling becomes)."""

    def __init__(self, path: Path, description: dict | None = None):
        self.meta_dir = Path(path)
        self._description = description or {"kind": "local", "path": str(Path(path).resolve())}
        if not (self.meta_dir / "config.json").is_file():
            raise MoeinfError(f"{path} has no config.json; give a Hugging Face checkpoint directory")
        self.shards = shard_names(self.meta_dir)
        missing = [s for s in self.shards if not (self.meta_dir / s).is_file()]
        if missing:
            raise MoeinfError(f"{path} lacks {', '.join(missing[:3])}; the checkpoint directory is incomplete")

    def describe(self) -> dict:
        """Where the checkpoint came from (for a GGUF or upcycled source: the original, not this temp dir)."""
        return dict(self._description)

    def shard_sizes(self) -> dict[str, int]:
        return {s: (self.meta_dir / s).stat().st_size for s in self.shards}

    def fingerprint(self) -> list:
        return [[s, (self.meta_dir / s).stat().st_size, int((self.meta_dir / s).stat().st_mtime)] for s in self.shards]

    def fetch(self, shard: str) -> Path:
        return self.meta_dir / shard

    def release(self, shard: str) -> None:
        return None

    def corrupt_hint(self, shard: str) -> str:
        return "re-download or re-export the checkpoint"


def is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not os.path.isabs(text)
