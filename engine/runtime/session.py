"""A loaded model ready to generate: ``engine.load(...) -> Session``.

The session owns the model (with its static KV cache of ``ctx`` positions), the tokenizer and the
expert source. It remembers which token ids are in the KV cache; each ``generate`` renders the whole
prompt (for a conversation, every turn again through the chat template), keeps the longest common
prefix with the cache and runs only the new suffix: prefill in chunks, then one token per step.
The cache bookkeeping is updated only after a forward pass completes, so stopping a generation at
any point (closing the generator, Ctrl+C) leaves the session consistent for the next call.

Every generation is one request: the expert source and the trace recorder hear ``begin_sequence``
before its prompt and ``end_sequence`` after its last token (or when it is stopped or superseded).
``close()`` (or leaving a ``with`` block) releases the expert cache's memory, its loader threads and
files, and the model's weights; the session cannot generate afterwards.

Example::

    import engine
    with engine.load("mixtral", device="cpu") as s:
        for piece in s.generate("Why is the sky blue?", temperature=0):
            if isinstance(piece, str):
                print(piece, end="", flush=True)
            else:
                stats = piece  # GenerationStats, always the last item
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.errors import MoeinfError
from engine.runtime.detokenize import StreamDecoder
from engine.runtime.devices import resolve_device, resolve_dtype
from engine.runtime.sampling import Sampler, SamplingParams
from engine.runtime.stats import GenerationStats
from engine.runtime.stops import StopScanner
from engine.runtime.tokenizer import Tokenizer
from engine.store.opened import StoreModel, open_model

PREFILL_CHUNK = 512  # prompt tokens per forward pass while prefilling (llama.cpp's default micro-batch)

Prompt = str | Sequence[Mapping[str, Any]]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """Generate with one model. Build it with ``engine.load``; the constructor takes ready parts."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        ctx: int,
        name: str = "",
        model_root: Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        experts: Any = None,
        recorder: Any = None,
        load_s: float = 0.0,
        config: Mapping[str, Any] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        expert_budget: str | None = None,
        policy: str | None = None,
        store: StoreModel | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.ctx = int(ctx)
        self.name = name
        self.model_root = model_root
        self.device = torch.device(device)
        self.dtype = dtype
        self.experts = experts
        self.recorder = recorder
        self.load_s = load_s
        self.config = dict(config or {})
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.expert_budget = expert_budget
        self.policy = policy
        self.store = store  # the opened model (engine.store.opened), when loaded from the store
        self._tokens: list[int] = []  # ids whose keys/values are in the KV cache, positions 0..n-1
        self._load_reported = False
        self._generation = 0  # id of the newest generation; older generators stop when it changes
        self._request: int | None = None  # the generation whose request is open (begun, not ended)
        self._closed = False
        self._last_only = "last_only" in inspect.signature(model.forward).parameters

    # ---- prompt -> token ids -------------------------------------------------------------

    def messages_for(self, prompt: Prompt, system: str | None = None) -> list[dict[str, Any]]:
        """The conversation for ``prompt``: a text becomes one user message; ``system`` is put first
        unless the conversation already starts with a system message."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = [dict(m) for m in prompt]
        if system is not None and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def prompt_ids(self, prompt: Prompt, raw: bool = False, system: str | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids the model sees for ``prompt``.

        raw: the text as is, with the tokenizer's own special tokens (e.g. BOS); a ``system`` text is put
        before it, separated by a blank line. Otherwise the chat
        template renders the conversation with the assistant's turn opened (``tools``: function
        definitions, OpenAI's shape, passed to the template); a model without a template
        gets the messages' contents joined by blank lines, tokenised like raw text.
        """
        tok = self.tokenizer
        if raw:
            if not isinstance(prompt, str):
                raise MoeinfError("raw mode takes a text prompt, not a list of messages")
            text = prompt if system is None else f"{system}\n\n{prompt}"
            return tok.encode(text, add_special_tokens=True)
        messages = self.messages_for(prompt, system)
        if tok.has_chat_template:
            extra = {"tools": [dict(t) for t in tools]} if tools else {}
            return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **extra))
        return tok.encode("\n\n".join(str(m.get("content", "")) for m in messages), add_special_tokens=True)

    # ---- model passes --------------------------------------------------------------------

    def _forward(self, ids: Sequence[int], start_pos: int, last_only: bool = False) -> torch.Tensor:
        self._check_open()
        # inference mode only around the pass: a generator must not leave it switched on for its caller
        with torch.inference_mode():
            tokens = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            if last_only and self._last_only:
                return self.model.forward(tokens, start_pos, last_only=True)
            return self.model.forward(tokens, start_pos)

    def _prefill(self, ids: Sequence[int], start: int) -> torch.Tensor:
        """Run ``ids[start:]`` (the cache holds ``ids[:start]``); the logits of the last position."""
        self._tokens = self._tokens[:start]
        last = None
        for s in range(start, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            out = self._forward(chunk, s, last_only=True)
            self._tokens.extend(chunk)
            last = out[-1]
        assert last is not None
        return last

    def _check_fits(self, n: int) -> None:
        if n >= self.ctx:
            raise MoeinfError(
                f"the prompt is {n} tokens but the context holds {self.ctx} (and needs room for the reply); "
                f"shorten the prompt or raise --ctx"
            )

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [T, V] of every position of ``token_ids``, run from position 0 (for tests).

        The KV cache then holds ``token_ids`` (a following ``generate`` may reuse them)."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise MoeinfError("logits() needs at least one token id")
        if len(ids) > self.ctx:
            raise MoeinfError(f"{len(ids)} tokens do not fit the context of {self.ctx}; raise ctx")
        self._generation += 1
        self._tokens = []
        outs = []
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            outs.append(self._forward(chunk, s).float().cpu())
            self._tokens.extend(chunk)
        return torch.cat(outs, dim=0).clone()  # a normal tensor (made in inference mode)

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self, prompt: Prompt, raw: bool = False, system: str | None = None, **sampling: Any
    ) -> Iterator[str | GenerationStats]:
        """Stream the reply to ``prompt`` (a text, or a list of ``{"role", "content"}`` messages).

        Yields text pieces (never a split UTF-8 character, never a stop string), then one
        ``GenerationStats``. ``sampling``: temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed, num_predict, stop (Ollama's names and defaults). Bad options, an
        unknown message format or a prompt that does not fit ``ctx`` raise MoeinfError here, before
        the first item.
        """
        self._check_open()
        params = SamplingParams.from_options(sampling)
        return self._start(self.prompt_ids(prompt, raw=raw, system=system), params)

    def generate_ids(self, ids: Sequence[int], **sampling: Any) -> Iterator[str | GenerationStats]:
        """``generate`` for a prompt already turned into token ids (``prompt_ids``): the same stream."""
        self._check_open()
        return self._start([int(t) for t in ids], SamplingParams.from_options(sampling))

    def _start(self, ids: list[int], params: SamplingParams) -> Iterator[str | GenerationStats]:
        if not ids:
            raise MoeinfError("the prompt is empty; give some text")
        self._check_fits(len(ids))
        self._generation += 1
        return self._run(ids, params, self._generation)

    def _run(self, ids: list[int], params: SamplingParams, generation: int) -> Iterator[str | GenerationStats]:
        t_start = time.perf_counter()
        stats = GenerationStats(prompt_tokens=len(ids))
        if not self._load_reported:
            stats.load_s, self._load_reported = self.load_s, True
        eos = set(self.tokenizer.eos_ids)
        decoder = StreamDecoder(self.tokenizer)
        stopper = StopScanner(params.stop)
        sampler = Sampler(params)
        history = list(ids)
        limit = params.num_predict if params.num_predict >= 0 else None
        self._begin_request(generation)
        t_eval = None
        try:
            start = common_prefix_len(self._tokens, ids)
            start = min(start, len(ids) - 1)  # the last prompt token always runs: its logits pick the next
            stats.prompt_eval_count = len(ids) - start
            logits = self._prefill(ids, start)
            t_eval = time.perf_counter()
            stats.prompt_eval_s = t_eval - t_start
            stats.done_reason = "length"
            stopped = False
            while limit is None or stats.generated_tokens < limit:
                if self._generation != generation:
                    raise MoeinfError("this generation was superseded by a newer call on the same session")
                token = sampler(logits, history)
                if token in eos:
                    stats.done_reason = "stop"
                    break
                stats.generated_tokens += 1
                history.append(token)
                text, stopped = stopper.push(decoder.push(token))
                if text:
                    yield text
                if stopped:
                    break
                if len(self._tokens) >= self.ctx or (limit is not None and stats.generated_tokens >= limit):
                    break  # no room for the token in the KV cache, or enough tokens
                logits = self._forward([token], len(self._tokens))[-1]
                self._tokens.append(token)
            if not stopped:  # release what the decoder and the stop scanner still hold
                tail, stopped = stopper.push(decoder.flush())
                if not stopped:
                    tail += stopper.flush()
                if tail:
                    yield tail
            if stopped:
                stats.done_reason = "stop"
        finally:
            self._end_request(generation)  # a superseded generation's request was ended by the newer one
        now = time.perf_counter()
        stats.eval_s = now - (t_eval if t_eval is not None else now)
        stats.total_s = stats.load_s + (now - t_start)
        stats.cache = self.experts.stats() if hasattr(self.experts, "stats") else None
        yield stats

    # ---- requests and lifetime ------------------------------------------------------------

    def _begin_request(self, generation: int) -> None:
        """Generation ``generation`` starts a request: the expert source and the recorder hear it (an
        open request of an older generation, abandoned without being closed, is ended first)."""
        if self._request is not None:
            self._end_request(self._request)
        self._request = generation
        for part in (self.experts, self.recorder):
            if part is not None and hasattr(part, "begin_sequence"):
                part.begin_sequence()

    def _end_request(self, generation: int) -> None:
        if self._request != generation:
            return
        self._request = None
        for part in (self.recorder, self.experts):
            if part is not None and hasattr(part, "end_sequence"):
                part.end_sequence()

    def _check_open(self) -> None:
        if self._closed:
            raise MoeinfError("this session is closed; load the model again")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End any open request, then release the expert source (cache memory, loader threads, files)
        and the model (weights, KV cache). Idempotent."""
        if self._closed:
            return
        self._generation += 1  # a generator still open stops at its next step
        if self._request is not None:
            self._end_request(self._request)
        self._closed = True
        if self.experts is not None and hasattr(self.experts, "close"):
            self.experts.close()
        self.model = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- housekeeping --------------------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """Token ids currently in the KV cache (a copy)."""
        return list(self._tokens)

    def reset(self) -> None:
        """Forget the KV cache contents; the next generation runs its whole prompt."""
        self._generation += 1
        self._tokens = []

    def parameter_count(self) -> int:
        """Parameters of the model: the resident ones plus every routed expert's tensors."""
        dense = sum(p.numel() for p in self.model.parameters()) if hasattr(self.model, "parameters") else 0
        store = self.store
        if store is None or not store.is_moe:
            return dense
        per_expert = sum(math.prod(t.shape) for t in store.expert_tensors.values())
        return dense + len(store.layout.moe_layers) * store.layout.num_experts * per_expert

    def info(self) -> dict[str, Any]:
        """What is loaded: name, path, family, device, dtype, ctx, vocabulary, expert source, cache use."""
        info: dict[str, Any] = {
            "name": self.name,
            "path": str(self.model_root) if self.model_root else None,
            "family": self.config.get("model_type"),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "ctx": self.ctx,
            "tokens_in_cache": len(self._tokens),
            "vocab_size": self.tokenizer.vocab_size,
            "chat_template": self.tokenizer.has_chat_template,
            "eos_ids": list(self.tokenizer.eos_ids),
            "experts": type(self.experts).__name__ if self.experts is not None else None,
            "budget": self.expert_budget,
            "policy": self.policy,
            "parameters": self.parameter_count(),
            "load_s": self.load_s,
        }
        if self.experts is not None and hasattr(self.experts, "stats"):
            stats = self.experts.stats()
            info["expert_cache"] = stats.as_dict() if hasattr(stats, "as_dict") else stats
        return info


def _open_experts(store: StoreModel, dtype: torch.dtype, device: torch.device, budget: str | None,
                  policy: str | None, recorder: Any, ctx: int, verbose: bool) -> Any:
    """The expert source of the memory hierarchy (``engine.memory.open_experts``); None for a dense model."""
    if not store.is_moe:
        return None
    from engine.memory import open_experts

    return open_experts(store, dtype, device, budget if budget is not None else "auto", policy, recorder,
                        ctx=ctx, verbose=verbose)


def _make_recorder(store: StoreModel) -> Any:
    """The routing-trace recorder (``engine.trace``) that persists this model's expert activations,
    or None for a dense model."""
    if not store.is_moe:
        return None
    from engine.trace.recorder import TraceRecorder

    # rows are decoder-layer indices, as the expert cache and its policies count them
    return TraceRecorder(store.root.name, store.layout.num_layers, store.layout.num_experts, model_dir=store.root)


def load(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    ctx: int = 4096,
    expert_budget: str | None = None,
    policy: str | None = None,
    verbose: bool = False,
    activations: str = "auto",
) -> Session:
    """Load a store model (a name from ``moeinf pull``, or a store directory) into a ``Session``.

    device: "cpu" or "cuda[:N]"; dtype: float32/bfloat16/float16 (default: the stored dtype);
    ctx: KV-cache length in tokens (prompt plus reply); expert_budget: how much of the routed experts
    stays in fast memory ("25%", "2GB", "100%" = all; None = "auto": what fits the free memory);
    policy: expert cache policy (a name of ``engine.policy.registry``; None = its default);
    activations: how float32 activations meet block-format (GGUF) weights on the CPU: "auto" (int8 per
    block on prompts, as llama.cpp; float32 on one-token decode), "float32" (never rounded), "int8"
    (decode too).
    Routing traces are recorded per generation under ``$MOEINF_HOME/traces/<model>``.
    """
    import sys

    t0 = time.perf_counter()
    from engine.runtime import MIN_CTX

    if int(ctx) < MIN_CTX:
        raise MoeinfError(f"--ctx must be at least {MIN_CTX} tokens (the context), got {ctx}")
    dev = resolve_device(device)
    store = open_model(name_or_path)
    torch_dtype = resolve_dtype(dtype, store.stored_dtype, dev)
    root, name = store.root, store.name
    if verbose:
        print(f"loading {name} from {root} ({str(torch_dtype).removeprefix('torch.')}, {dev}, ctx {ctx})", file=sys.stderr)
    from engine.memory.budget import check_context
    from engine.memory.open import context_bytes

    check_context(int(ctx), context_bytes(store.config, int(ctx), torch_dtype), dev)
    tokenizer = Tokenizer(root)
    recorder = _make_recorder(store)
    experts = _open_experts(store, torch_dtype, dev, expert_budget, policy, recorder, int(ctx), verbose)

    from engine.model.loader import load_model

    model = load_model(store, dtype=torch_dtype, device=dev, experts=experts, max_seq_len=int(ctx),
                       activations=activations)
    load_s = time.perf_counter() - t0
    return Session(model, tokenizer, ctx=int(ctx), name=name, model_root=root, device=dev, dtype=torch_dtype,
                   experts=experts, recorder=recorder, load_s=load_s, config=store.config,
                   expert_budget=expert_budget, policy=policy, store=store)
