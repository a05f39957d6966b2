"""What the ``/show`` commands print: facts about the loaded model, its expert cache, its chat template
and license, and the session as an Ollama-style Modelfile.

Built from ``Session.info()``, the model config (``engine.store.families.moe_layout``), the
tokenizer's chat template, the store folder and the expert source's ``stats()``; every function
returns text and prints nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NO_TEMPLATE = "No prompt template was specified for this model."
NO_LICENSE = "No license was specified for this model."
# License files a store folder may hold (``moeinf pull`` keeps them), looked for in this order.
LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt")
DEFAULT_NUM_CTX = 4096  # engine.load's ctx and the --ctx default of run and chat

# Counters of engine.memory's CacheStats that grow during an answer (the rest describe the cache).
CACHE_COUNTERS = (
    "accesses",
    "hits",
    "demand_loads",
    "prefetch_loads",
    "prefetch_useful",
    "prefetch_wasted",
    "prefetch_cancelled",
    "prefetch_dropped",
    "streamed",
    "evictions",
    "bytes_loaded",
    "stall_s",
)
CACHE_LAYER_COUNTERS = ("layer_hits", "layer_accesses")


def human_count(n: float) -> str:
    """A parameter count as Ollama shows it: ``135.0M``, ``46.7B``, ``980K``."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def parameter_count(session: Any) -> int | None:
    """Dense parameters held by the model plus every routed expert's (from the MoE layout); None if unknown."""
    model = getattr(session, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    dense = sum(p.numel() for p in model.parameters())
    layout = _layout(session)
    if layout is None or not layout.is_moe:
        return dense
    per_expert = 3 * layout.hidden_size * layout.expert_intermediate_size
    return dense + per_expert * layout.num_experts * len(layout.moe_layers)


def _layout(session: Any) -> Any:
    config = getattr(session, "config", None)
    if not config:
        return None
    try:
        from engine.store.families import moe_layout

        return moe_layout(dict(config))
    except Exception:  # an unsupported or partial config: show what else is known
        return None


def _rows(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    lines = [f"  {title}"]
    lines += [f"    {key:<22}{value}" for key, value in rows if value not in (None, "")]
    return lines


# The expert-cache figures /show info lists (key in CacheStats.as_dict(), label); the summary line
# already gives hit rate, MB loaded and time stalled.
CACHE_FIGURES = (
    ("mode", "mode"),
    ("budget_note", "budget note"),
    ("io", "reads"),
    ("resident_experts", "resident experts"),
    ("resident_bytes", "resident bytes"),
    ("evictions", "evictions"),
)


def info_lines(session: Any, load_kwargs: Mapping[str, Any]) -> list[str]:
    """``/show info``: the model (name, family, parameters, experts, context, dtype, device) and the
    expert cache (budget, policy, hit rate and the rest of the cache figures so far)."""
    info = dict(session.info()) if hasattr(session, "info") else {}
    layout = _layout(session)
    params = info.get("parameters") or parameter_count(session)
    model_rows: list[tuple[str, Any]] = [
        ("name", info.get("name")),
        ("family", info.get("family")),
        ("parameters", human_count(params) if isinstance(params, int | float) else params),
    ]
    if layout is not None and layout.is_moe:
        model_rows.append(
            (
                "experts",
                f"{layout.num_experts} per layer, top-{layout.top_k}, "
                f"{len(layout.moe_layers)} of {layout.num_layers} layers",
            )
        )
    model_rows += [
        ("context length", info.get("ctx", getattr(session, "ctx", None))),
        ("tokens in KV cache", info.get("tokens_in_cache")),
        ("dtype", info.get("dtype")),
        ("device", info.get("device")),
        ("path", info.get("path")),
    ]
    lines = _rows("Model", model_rows)
    if layout is None or layout.is_moe:
        cache_rows: list[tuple[str, Any]] = [
            ("budget", info.get("budget") or load_kwargs.get("expert_budget") or "auto"),
        ]
        cache = cache_stats(session)
        default_policy = getattr(cache, "policy", "")
        cache_rows.append(
            (
                "policy",
                info.get("policy")
                or load_kwargs.get("policy")
                or (f"{default_policy} (default)" if default_policy else "default"),
            )
        )
        if cache is not None and hasattr(cache, "summary_line"):
            cache_rows.append(("so far", str(cache.summary_line()).removeprefix("experts: ")))
        figures = info.get("expert_cache")
        if isinstance(figures, Mapping):
            cache_rows += [
                (label, _bytes(figures[key]) if key.endswith("bytes") else _fmt(figures[key]))
                for key, label in CACHE_FIGURES
                if key in figures
            ]
        lines += [""] + _rows("Expert cache", cache_rows)
    return lines


def cache_stats(session: Any) -> Any:
    """The expert source's cumulative stats object, or None when it keeps none."""
    experts = getattr(session, "experts", None)
    if experts is not None and hasattr(experts, "stats"):
        return experts.stats()
    return None


def _bytes(value: Any) -> Any:
    if not isinstance(value, int | float):
        return value
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def cache_snapshot(session: Any) -> Any:
    """A copy of the cumulative cache stats now (to subtract after an answer), or None."""
    stats = cache_stats(session)
    return copy.deepcopy(stats) if stats is not None else None


def cache_delta(after: Any, before: Any) -> Any:
    """The cache figures of one answer: ``after`` minus ``before`` for every counter (hit rate, loads,
    bytes, stall time), the descriptive fields (budget, policy, residency) of ``after``. When the two
    cannot be subtracted (not the same dataclass), ``after`` as it is."""
    if (
        before is None
        or after is None
        or type(before) is not type(after)
        or not dataclasses.is_dataclass(after)
    ):
        return after
    names = {f.name for f in dataclasses.fields(after)}
    changes: dict[str, Any] = {
        n: getattr(after, n) - getattr(before, n) for n in CACHE_COUNTERS if n in names
    }
    for n in CACHE_LAYER_COUNTERS:
        if n in names:
            a, b = getattr(after, n), getattr(before, n)
            changes[n] = {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
    return dataclasses.replace(after, **changes)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def parameters_lines(sampling: Mapping[str, Any]) -> list[str]:
    """``/show parameters``: the values set in this session, then the defaults of the rest."""
    try:
        from dataclasses import fields

        from engine.runtime.sampling import SamplingParams

        defaults = {f.name: f.default for f in fields(SamplingParams)}
    except ImportError:
        defaults = {}
    lines = []
    if sampling:
        lines.append("User defined parameters:")
        lines += [f"{name:<16}{_param_text(value)}" for name, value in sampling.items()]
    rest = {k: v for k, v in defaults.items() if k not in sampling}
    if rest:
        if lines:
            lines.append("")
        lines.append("Default parameters:")
        lines += [f"{name:<16}{_param_text(value)}" for name, value in rest.items()]
    return lines


def _param_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(repr(v) if " " in v or not v else v for v in value) if value else "(none)"
    if value is None:
        return "(random)"
    return str(value)


def chat_template(session: Any) -> str | None:
    """The jinja chat template the session renders prompts with (chat_template.jinja or
    tokenizer_config.json's chat_template), or None when the model has none."""
    template = getattr(getattr(session, "tokenizer", None), "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def model_root(session: Any) -> Path | None:
    """The store folder of the loaded model, or None when unknown."""
    root = getattr(session, "model_root", None)
    if root is None and hasattr(session, "info"):
        root = dict(session.info()).get("path")
    return Path(root) if root else None


def license_text(session: Any) -> str | None:
    """The model's license: the first of LICENSE_FILES in its store folder, else a ``license`` field of
    its config (e.g. "apache-2.0"); None when neither is there."""
    root = model_root(session)
    if root is not None:
        for name in LICENSE_FILES:
            path = root / name
            if path.is_file():
                try:
                    text = path.read_text(encoding="utf-8", errors="replace").strip()
                except OSError:
                    continue
                if text:
                    return text
    field = (getattr(session, "config", None) or {}).get("license")
    return field.strip() if isinstance(field, str) and field.strip() else None


def _modelfile_value(value: Any) -> str:
    """A PARAMETER value as a Modelfile holds it: plain, or double-quoted when it has spaces or quotes."""
    text = str(value)
    if not text or any(c.isspace() or c == '"' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def modelfile_lines(
    model: str,
    template: str | None,
    system: str | None,
    sampling: Mapping[str, Any],
    ctx: int | None = None,
) -> list[str]:
    """``/show modelfile``: the session as an Ollama Modelfile: FROM the model, its TEMPLATE, the SYSTEM
    message, one PARAMETER line per parameter set in the session (one per stop string), and num_ctx
    when the context is not the default one."""
    lines = ['# Modelfile generated by "/show modelfile"', f"FROM {model}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    params = {k: v for k, v in sampling.items() if v is not None}
    if ctx is not None and int(ctx) != DEFAULT_NUM_CTX:
        params.setdefault("num_ctx", int(ctx))
    for name in sorted(params):
        value = params[name]
        for one in value if isinstance(value, list | tuple) else [value]:
            lines.append(f"PARAMETER {name} {_modelfile_value(one)}")
    return lines
