"""The policy registry: every cache policy by name, and the default.

``make_policy(name, **kw)`` builds a policy by name; ``POLICY_NAMES`` lists the names,
``DEFAULT_POLICY`` is the one used when none is given, and ``policy_choices()`` is the phrase the
CLI's help uses to name them (errors name them from ``POLICY_NAMES`` too). Keyword arguments a policy does not take are ignored,
so callers can pass the same context (e.g. ``model_name=``) whatever the name.

Adding a policy: one module in this package (a ``Policy`` subclass whose ``name`` is its key here)
and its line in ``POLICIES``. Modules are imported when a policy is built, so reading the names
(the CLI does, to print its help) costs nothing.
"""

from __future__ import annotations

import importlib
import inspect

from engine.errors import MoeinfError
from engine.policy.base import Policy

POLICIES: dict[str, str] = {  # name -> "module:class"
    "lru": "engine.policy.lru:LRUPolicy",
    "lfu": "engine.policy.lfu:LFUPolicy",
    "eam": "engine.policy.eam:EAMPolicy",
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
DEFAULT_POLICY = "eam"


def policy_choices() -> str:
    """'lru, lfu or eam': the registered names, for help strings."""
    *rest, last = POLICY_NAMES
    return f"{', '.join(rest)} or {last}" if rest else last


def policy_class(name: str | None = None) -> type[Policy]:
    """The class registered as ``name`` (None: ``DEFAULT_POLICY``); a one-line MoeinfError if unknown."""
    key = (name or DEFAULT_POLICY).strip().lower()
    target = POLICIES.get(key)
    if target is None:
        raise MoeinfError(f"unknown policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_policy(name: str | None = None, **kw: object) -> Policy:
    """A new policy object by name (None: ``DEFAULT_POLICY``); unused keyword arguments are ignored."""
    cls = policy_class(name)
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls(**kw)
    return cls(**{k: v for k, v in kw.items() if k in params})
