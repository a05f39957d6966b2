"""Sparse upcycling: a dense llama checkpoint -> a Mixtral-style MoE (upcycled, not trained).

It sits above the runtime because it runs the dense model (to calibrate the routers), and reaches the
store as a ``SourceTransform`` of the pull: ``moeinf pull SOURCE --upcycle 8 --top-k 2`` is
``pull_model(SOURCE, transform=Upcycle(8, 2))``.

Modules: ``checkpoint`` (``upcycle_checkpoint``: experts as copies of the dense FFN, the Mixtral
config), ``router`` (calibration text and the k-means routers).

Example::

    from engine.store.pull import pull_model
    from engine.upcycle import Upcycle
    pull_model("SmolLM2-135M-Instruct.Q4_1.gguf", name="smollm2-moe", transform=Upcycle(8, 2))
"""

from __future__ import annotations

from pathlib import Path

from engine.store.pull import PullProgress

DEFAULT_TOP_K = 2


class Upcycle:
    """The pull step that upcycles the source checkpoint into ``num_experts`` experts, ``top_k`` per token."""

    def __init__(
        self, num_experts: int, top_k: int | None = None, *, max_new_tokens: int = 48, seed: int = 0
    ):
        from engine.upcycle.checkpoint import check_options

        top_k = DEFAULT_TOP_K if top_k is None else top_k
        check_options(num_experts, top_k)
        self.num_experts, self.top_k = num_experts, top_k
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.record = {"num_experts": num_experts, "top_k": top_k}
        self.name_suffix = f"-moe{num_experts}"
        self.description = f"upcycling into {num_experts} experts, top-{top_k}"

    def apply(self, checkpoint_dir: Path, out_dir: Path, dtype: str | None, progress: PullProgress) -> Path:
        from engine.upcycle.checkpoint import upcycle_checkpoint

        progress.message(self.description)
        return upcycle_checkpoint(
            checkpoint_dir,
            out_dir,
            self.num_experts,
            self.top_k,
            dtype,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            progress=progress,
        )


__all__ = ["DEFAULT_TOP_K", "Upcycle"]
