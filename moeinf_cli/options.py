"""The options several commands share, declared once: the model argument, loading, sampling.

A command takes a group of options with ``@with_options(load=LOAD, sampling=SAMPLING)``: the group's
options appear in its ``--help`` (under their own heading) and arrive in one dict parameter named as
the keyword (``load``, ``sampling``), holding only the options the user set, so the library's
defaults apply to the others. Single options (``DEVICE``, ``VERBOSE``, ...) are taken the same way,
positionally, and arrive under their own name. An option added to a group here appears in every
command that takes the group (``run``, ``chat``, ``serve``, ...).

Example::

    @app.command("run")
    @with_options(SYSTEM, VERBOSE, load=LOAD, sampling=SAMPLING)
    def run(model: Model, prompt: str | None = None, *, system, verbose, load: dict, sampling: dict): ...
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from engine.policy import registry as _policies
from engine.store.dtypes import CHOICES as DTYPE_CHOICES

# How a size or share of memory is written, for every command that takes a budget.
BUDGET_FORMS = "a share of all experts (25%), a size (2GB, 1.5GiB), 100% (all resident) or auto"
DTYPE_FORMS = DTYPE_CHOICES  # the spellings engine.store.dtypes accepts
POLICY_NAMES = _policies.policy_choices()  # from the registry: "lru, lfu or eam"
ALL_POLICIES = ",".join(_policies.POLICY_NAMES)
DEFAULT_POLICY = _policies.DEFAULT_POLICY
DEFAULT_CTX = 4096

LOADING_PANEL = "Model loading"
SAMPLING_PANEL = "Sampling (defaults as Ollama's)"


def complete_model_name(incomplete: str) -> list[str]:
    """Shell completion of MODEL: the store's model names starting with what was typed."""
    from engine.store.manifest import store_names

    return [name for name in store_names() if name.startswith(incomplete)]


Model = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A model in the store (see `moeinf list`) or a store directory.",
        autocompletion=complete_model_name,
        show_default=False,
    ),
]


@dataclass(frozen=True)
class Opt:
    """One shared option: the parameter name a command receives, its type, and its typer declaration."""

    name: str
    annotation: Any
    info: Any  # typer.models.OptionInfo

    def parameter(self) -> inspect.Parameter:
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=self.info, annotation=self.annotation
        )


def _opt(
    name: str,
    annotation: Any,
    default: Any,
    *decls: str,
    help: str,
    metavar: str | None = None,
    panel: str | None = None,
) -> Opt:
    return Opt(
        name,
        annotation,
        typer.Option(default, *decls, help=help, metavar=metavar, rich_help_panel=panel, show_default=False),
    )


DEVICE = _opt(
    "device",
    str,
    "auto",
    "--device",
    metavar="DEVICE",
    panel=LOADING_PANEL,
    help="cpu, cuda, cuda:N, or auto (cuda when available). (default auto)",
)
DTYPE = _opt(
    "dtype",
    str | None,
    None,
    "--dtype",
    metavar="DTYPE",
    panel=LOADING_PANEL,
    help=f"Compute dtype: {DTYPE_FORMS}. (default the stored dtype)",
)
ACTIVATIONS = _opt(
    "activations",
    str | None,
    None,
    "--activations",
    metavar="MODE",
    panel=LOADING_PANEL,
    help="float32 models on GGUF block weights: auto (int8 activations per block on prompts, as llama.cpp; "
    "float32 on one-token decode), float32 (never rounded), int8 (decode too). (default auto)",
)
CTX = _opt(
    "ctx",
    int,
    DEFAULT_CTX,
    "--ctx",
    metavar="N",
    panel=LOADING_PANEL,
    help=f"Context length in tokens (the prompt or conversation plus the answer). (default {DEFAULT_CTX})",
)
EXPERT_BUDGET = _opt(
    "expert_budget",
    str | None,
    None,
    "--expert-budget",
    metavar="BUDGET",
    panel=LOADING_PANEL,
    help=f"Fast memory for routed experts: {BUDGET_FORMS}. "
    "(default auto: what fits in free memory, all experts when they fit)",
)
POLICY = _opt(
    "policy",
    str | None,
    None,
    "--policy",
    metavar="POLICY",
    panel=LOADING_PANEL,
    help=f"Expert cache policy: {POLICY_NAMES}. (default {DEFAULT_POLICY})",
)

TEMPERATURE = _opt(
    "temperature",
    float | None,
    None,
    "--temperature",
    metavar="T",
    panel=SAMPLING_PANEL,
    help="Sampling temperature; 0 always picks the likeliest token. (default 0.8)",
)
TOP_K = _opt(
    "top_k",
    int | None,
    None,
    "--top-k",
    metavar="K",
    panel=SAMPLING_PANEL,
    help="Sample from the K likeliest tokens; 0 = all. (default 40)",
)
TOP_P = _opt(
    "top_p",
    float | None,
    None,
    "--top-p",
    metavar="P",
    panel=SAMPLING_PANEL,
    help="Sample from the fewest tokens whose probabilities sum to P; 1 = off. (default 0.9)",
)
MIN_P = _opt(
    "min_p",
    float | None,
    None,
    "--min-p",
    metavar="P",
    panel=SAMPLING_PANEL,
    help="Drop tokens less likely than P times the likeliest. (default 0.0)",
)
REPEAT_PENALTY = _opt(
    "repeat_penalty",
    float | None,
    None,
    "--repeat-penalty",
    metavar="X",
    panel=SAMPLING_PANEL,
    help="Penalty for repeating recent tokens; 1 = off. (default 1.1)",
)
REPEAT_LAST_N = _opt(
    "repeat_last_n",
    int | None,
    None,
    "--repeat-last-n",
    metavar="N",
    panel=SAMPLING_PANEL,
    help="How many recent tokens the penalty looks at; 0 = off, -1 = the whole context. (default 64)",
)
SEED = _opt(
    "seed",
    int | None,
    None,
    "--seed",
    metavar="N",
    panel=SAMPLING_PANEL,
    help="Random seed, for answers that repeat. (default random)",
)
NUM_PREDICT = _opt(
    "num_predict",
    int | None,
    None,
    "--num-predict",
    "-n",
    metavar="N",
    panel=SAMPLING_PANEL,
    help="At most N tokens per answer; -1 = until the end of the answer or a full context. (default -1)",
)
STOP = _opt(
    "stop",
    list[str] | None,
    None,
    "--stop",
    metavar="TEXT",
    panel=SAMPLING_PANEL,
    help="Stop the answer where this text appears (not printed); repeatable.",
)

SYSTEM = _opt(
    "system",
    str | None,
    None,
    "--system",
    "-s",
    metavar="TEXT",
    help="System prompt (sent with the chat template).",
)
VERBOSE = _opt(
    "verbose",
    bool,
    False,
    "--verbose",
    "-v",
    help="After each answer, print timings and expert-cache figures to stderr.",
)

LOAD = (DEVICE, DTYPE, ACTIVATIONS, CTX, EXPERT_BUDGET, POLICY)
SAMPLING = (TEMPERATURE, TOP_K, TOP_P, MIN_P, REPEAT_PENALTY, REPEAT_LAST_N, SEED, NUM_PREDICT, STOP)


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user set: None (and an empty repeatable option) means "not given"."""
    return {
        k: (list(v) if isinstance(v, list | tuple) else v)
        for k, v in values.items()
        if v is not None and v != []
    }


def with_options(
    *single: Opt, **groups: tuple[Opt, ...]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add shared options to a command function: each of ``single`` arrives as its own keyword argument,
    each group as one dict (``given`` of its options) under the group's keyword."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        own = [
            p
            for p in signature.parameters.values()
            if p.name not in groups and p.name not in {o.name for o in single}
        ]
        added = [o.parameter() for o in single] + [o.parameter() for opts in groups.values() for o in opts]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for key, opts in groups.items():
                kwargs[key] = given({o.name: kwargs.pop(o.name) for o in opts})
            return fn(**kwargs)

        params = own + added
        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not the function's
        return command

    return wrap
