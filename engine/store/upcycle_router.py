"""Routers for an upcycled model: k-means centroids of each layer's FFN inputs on self-generated text.

``collect_ffn_inputs`` runs the dense model (the engine's ``llama`` family) on a few varied seed
prompts, lets it continue each one (sampled, seeded) and records, through a forward hook on
``model.layers[i].mlp``, every FFN input (the post-attention-norm hidden state) of every token.
``router_weights`` clusters one layer's inputs with spherical k-means after centring them and
removing the mean direction, and returns the scaled centroids as the router matrix [E, H]:
``logits = W x = s * C (x - mean)_perp``, so a token goes to the experts whose centroids point
the way its hidden state deviates from the average one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SEED_PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Write a short poem about the sea at night.",
    "List ten fruits and their colours.",
    "Explain how photosynthesis works, step by step.",
    "Tell me a story about a robot who learns to paint.",
    "What is 17 times 23? Show the working.",
    "Translate 'good morning, how are you?' into French, Spanish and German.",
)


@dataclass(frozen=True)
class Calibration:
    """Per-layer FFN inputs [N, H] (float32) and how many tokens they cover."""

    inputs: list[torch.Tensor]
    tokens: int
    prompts: int


def _store_copy(src_dir: Path, work: Path) -> Path:
    """The dense checkpoint as a store directory the engine can load. A dense llama's store layout is
    its checkpoint's (config, tokenizer files, ``dense/*.safetensors`` with the same tensor names, as
    A's converter writes it), so the files are linked rather than rewritten."""
    root = work / "dense-model"
    (root / "dense").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja"):
        if (src_dir / name).is_file():
            (root / name).symlink_to((src_dir / name).resolve())
    for index, shard in enumerate(sorted(src_dir.glob("*.safetensors")), start=1):
        (root / "dense" / f"part-{index:05d}.safetensors").symlink_to(shard.resolve())
    return root


def collect_ffn_inputs(
    src_dir: Path,
    prompts: tuple[str, ...] = SEED_PROMPTS,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
) -> Calibration:
    """Run the dense model of ``src_dir`` on ``prompts`` and its own sampled continuations; return
    every FFN input it saw, per layer."""
    from engine.model.loader import load_model
    from engine.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(src_dir)
    with tempfile.TemporaryDirectory(prefix="moeinf-upcycle-") as tmp:
        root = _store_copy(Path(src_dir), Path(tmp))
        encoded = []
        for prompt in prompts:
            if tokenizer.has_chat_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                encoded.append(tokenizer.encode(text))
            else:
                encoded.append(tokenizer.encode(prompt, add_special_tokens=True))
        max_len = max(len(e) for e in encoded) + max_new_tokens
        model = load_model(root, dtype=torch.float32, device="cpu", max_seq_len=max_len)
        captured: list[list[torch.Tensor]] = [[] for _ in model.layers]

        def hook(index: int):
            def record(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
                captured[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
            return record

        handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
        gen = torch.Generator().manual_seed(seed)
        eos = set(tokenizer.eos_ids)
        tokens = 0
        try:
            for ids in encoded:
                logits = model(torch.tensor(ids, dtype=torch.long), 0, last_only=True)[-1]
                tokens += len(ids)
                pos = len(ids)
                for _ in range(max_new_tokens):
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                    if nxt in eos:
                        break
                    logits = model(torch.tensor([nxt], dtype=torch.long), pos)[-1]
                    pos += 1
                    tokens += 1
        finally:
            for h in handles:
                h.remove()
    return Calibration([torch.cat(c) for c in captured], tokens, len(prompts))


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Unit centroids [k, H] of the directions of ``x`` [N, H] (k-means++ seeding on cosine distance)."""
    u = torch.nn.functional.normalize(x.float(), dim=-1)
    n = u.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} points, got {n}")
    gen = torch.Generator().manual_seed(seed)
    centroids = [u[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        sims = u @ torch.stack(centroids).T
        dist = (1.0 - sims.max(dim=1).values).clamp_min(0) + 1e-12
        centroids.append(u[int(torch.multinomial(dist, 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (u @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, u)
        empty = torch.bincount(assign, minlength=k) == 0
        if empty.any():  # re-seed an empty cluster at the point farthest from its centroid
            worst = (u * c[assign]).sum(-1).argsort()[: int(empty.sum())]
            sums[empty] = u[worst]
        new = torch.nn.functional.normalize(sums, dim=-1)
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c


@dataclass(frozen=True)
class Router:
    """One layer's router matrix [E, H] and what it does on the calibration tokens."""

    weight: torch.Tensor
    scale: float
    median_margin: float  # median gap between the top_k-th and the next logit, calibration tokens


def router_weights(x: torch.Tensor, num_experts: int, top_k: int, margin: float = 4.0, seed: int = 0) -> Router:
    """The router of one layer from its FFN inputs ``x`` [N, H]: centroids of the centred inputs with
    the mean direction removed, scaled so that the median gap between the top_k-th and the next
    logit on ``x`` is ``margin`` (decisive routing; identical experts make any choice exact)."""
    x = x.float()
    mean = x.mean(dim=0)
    mean_dir = torch.nn.functional.normalize(mean, dim=0)
    z = x - mean
    z = z - (z @ mean_dir)[:, None] * mean_dir[None, :]
    c = spherical_kmeans(z, num_experts, seed=seed)
    c = c - (c @ mean_dir)[:, None] * mean_dir[None, :]  # rows orthogonal to the mean: W x == W z
    c = torch.nn.functional.normalize(c, dim=-1)
    logits = x @ c.T
    if top_k < num_experts:
        top = logits.topk(top_k + 1, dim=-1).values
        gap = float((top[:, top_k - 1] - top[:, top_k]).median())
    else:
        gap = float((logits.max(-1).values - logits.min(-1).values).median())
    scale = margin / max(gap, 1e-6)
    return Router(c * scale, scale, margin)
