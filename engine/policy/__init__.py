"""Expert-cache policies: which expert to evict and which to load ahead, live and offline.

* ``base``: the ``Policy`` interface (``Key`` = (layer, expert)) and its call order.
* ``lru``, ``lfu``: the classic replacement policies (demand paging).
* ``eam``: ``EAMPolicy``, the trace-driven default (reuse predicted from recency, the EAM
  collection of past requests, cross-layer transitions and early router hints; evicts the expert
  least likely to be used within the cache's horizon; its learned weights persist in the TraceStore).
* ``oracle``: ``TokenOraclePolicy``, a reference told the rest of each token (offline only).
* ``registry``: ``make_policy(name)``, ``POLICY_NAMES``, ``DEFAULT_POLICY``, ``policy_choices()``
  (the only list of policy names; the CLI's help and errors read it).
* ``replay``: the offline evaluator (``replay``, ``belady_loads``, ``capacity_for``).
* ``holdout``: held-out replays (each sequence against the state the others left: ``heldout_splits``,
  ``learned_state``).

The same policy object drives the live expert cache (``engine/memory``) and ``replay``. This
package reads routing data from ``engine/trace`` and is used by ``engine/memory``.
"""

from engine.policy.base import Key, Policy
from engine.policy.registry import DEFAULT_POLICY, POLICY_NAMES, make_policy, policy_choices

__all__ = ["DEFAULT_POLICY", "POLICY_NAMES", "Key", "Policy", "make_policy", "policy_choices"]
