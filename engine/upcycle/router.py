"""Routers for an upcycled model: k-means centroids of each layer's FFN inputs on self-generated text.

``collect_ffn_inputs`` runs the dense model (the engine's ``llama`` family) on a few varied seed
prompts, lets it continue each one (sampled, seeded) and records, through a forward hook on
``model.layers[i].mlp``, every FFN input (the post-attention-norm hidden state) of every token.
``router_weights`` centres one layer's inputs, removes the mean direction, projects them onto their
slowest-changing directions (linear slow feature analysis over consecutive tokens) and clusters
them with spherical k-means; the centroids, mapped back to the hidden space and scaled, are the
router matrix [E, H]: ``logits = W x = s * C P^T (x - mean)_perp``. A token goes to the experts
whose centroids point the way its context pushes the hidden state, so routing is input-dependent
and consecutive tokens tend to share experts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.store.pull import PullProgress

SEED_PROMPTS = (
    "What is the tallest mountain in the world, and how was it first climbed?",
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Write a short poem about the sea at night.",
    "List ten fruits and their colours.",
    "Explain how photosynthesis works, step by step.",
    "Tell me a story about a robot who learns to paint.",
)


@dataclass(frozen=True)
class Calibration:
    """Per-layer FFN inputs [N, H] (float32), token count, and the length of each sequence (the rows
    of ``inputs`` are the sequences back to back, tokens in order)."""

    inputs: list[torch.Tensor]
    tokens: int
    prompts: int
    lengths: list[int]


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


def _dequantize_linears(model: torch.nn.Module) -> None:
    """Give every linear layer that computes on stored blocks (a GGUF's Q4_1, ...) its weight in
    float32 once: calibration runs the dense model for a few hundred steps, and dequantising each
    block at every step cost most of a pull (about 130 of 160 s for the demo's SmolLM2 Q4_1)."""
    from engine.formats.tensor import QuantTensor

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, QuantTensor):
            del module.weight
            module.weight = weight.dequantize(torch.float32)


def collect_ffn_inputs(
    src_dir: Path,
    prompts: tuple[str, ...] = SEED_PROMPTS,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    seed: int = 0,
    progress: PullProgress | None = None,
) -> Calibration:
    """Run the dense model of ``src_dir`` on ``prompts`` and its own sampled continuations; return
    every FFN input it saw, per layer. ``progress`` sees one task: the tokens run (at most the prompts'
    tokens plus ``max_new_tokens`` per prompt; a continuation that ends early counts as finished)."""
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
        most = sum(len(e) for e in encoded) + len(encoded) * max_new_tokens
        advance = (progress or PullProgress()).task("calibration text from the dense model", most, unit="tokens")
        model = load_model(root, dtype=torch.float32, device="cpu", max_seq_len=max_len)
        _dequantize_linears(model)
        captured: list[list[torch.Tensor]] = [[] for _ in model.layers]

        def hook(index: int):
            def record(_module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> None:
                captured[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
            return record

        handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
        gen = torch.Generator().manual_seed(seed)
        eos = set(tokenizer.eos_ids)
        tokens = 0
        lengths: list[int] = []
        try:
            for ids in encoded:
                before = tokens
                logits = model(torch.tensor(ids, dtype=torch.long), 0, last_only=True)[-1]
                tokens += len(ids)
                advance(len(ids))
                pos = len(ids)
                for _ in range(max_new_tokens):
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                    if nxt in eos:
                        break
                    logits = model(torch.tensor([nxt], dtype=torch.long), pos)[-1]
                    pos += 1
                    tokens += 1
                    advance(1)
                lengths.append(tokens - before)
                advance(max_new_tokens - (tokens - before - len(ids)))  # an early end: this prompt is done
        finally:
            for h in handles:
                h.remove()
    return Calibration([torch.cat(c) for c in captured], tokens, len(prompts), lengths)


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


def slow_features(z: torch.Tensor, lengths: list[int], dims: int, reg: float = 0.05) -> torch.Tensor:
    """Projection [H, dims] onto the directions of ``z`` [N, H] that change slowest from one token to
    the next (linear slow feature analysis: whiten, then the top eigenvectors of the symmetrised lag-1
    covariance within each sequence). ``reg`` adds that fraction of the mean variance to the
    covariance's diagonal, so few tokens in many dimensions stay well-posed."""
    n, h = z.shape
    cov = z.T @ z / n
    cov = cov + reg * cov.trace() / h * torch.eye(h)
    starts = torch.tensor([0] + list(lengths[:-1])).cumsum(0)
    idx = torch.cat([torch.arange(s, s + length - 1) for s, length in zip(starts.tolist(), lengths, strict=True)])
    a, b = z[idx], z[idx + 1]
    lag = (a.T @ b + b.T @ a) / (2 * len(idx))
    evals, evecs = torch.linalg.eigh(cov)
    whiten = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    _, u = torch.linalg.eigh(whiten @ lag @ whiten)
    return whiten @ u[:, -dims:]


def router_weights(x: torch.Tensor, num_experts: int, top_k: int, lengths: list[int] | None = None,
                   slow_dims: int = 16, margin: float = 4.0, seed: int = 0) -> Router:
    """The router of one layer from its FFN inputs ``x`` [N, H] (sequences of ``lengths`` back to back).

    The inputs are centred and their mean direction removed (the router has no bias, so its rows
    must be orthogonal to the mean for ``W x`` to see only the deviation). When ``lengths`` are given,
    they are projected onto their ``slow_dims`` slowest-changing directions (``slow_features``), so the
    router follows the context and consecutive tokens tend to share experts; spherical k-means then
    clusters them into ``num_experts`` centroids, mapped back to rows of W. The rows are scaled so the
    median gap between the top_k-th and the next logit on ``x`` is ``margin`` (decisive routing;
    identical experts make any choice exact)."""
    x = x.float()
    mean = x.mean(dim=0)
    mean_dir = torch.nn.functional.normalize(mean, dim=0)
    z = x - mean
    z = z - (z @ mean_dir)[:, None] * mean_dir[None, :]
    if lengths and sum(n - 1 for n in lengths) > 2 * slow_dims and slow_dims < z.shape[1]:
        proj = slow_features(z, lengths, slow_dims)
        c = spherical_kmeans(z @ proj, num_experts, seed=seed) @ proj.T
    else:
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
