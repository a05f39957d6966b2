"""The expert memory hierarchy: host tier, budgeted device expert cache, async loader, policies.

``open_experts(model_root, dtype, device, budget, policy, recorder)`` returns the ExpertSource the
model reads its routed experts through (``engine.model.experts``): ``ResidentExperts`` when the
budget holds everything, else ``OffloadedExperts`` (slots, policy, async loader). Both have
``stats() -> CacheStats`` (``summary_line()``, ``as_dict()``) and ``close()``.
"""

from engine.memory.budget import parse_budget
from engine.memory.open import open_experts
from engine.memory.stats import CacheStats

__all__ = ["CacheStats", "open_experts", "parse_budget"]
