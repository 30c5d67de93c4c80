"""moeyard.offload: single-node expert offload (slot cache over a disk tier, routing-path prefetch).

``LLM(model, mode="offload", expert_cache_fraction=0.25, prefetch=True, predictor="router")``; see ``mode.py``.
"""

from .cache import EVICTION, ExpertCache
from .mode import OffloadConfigError, build_offload, plan_slots
from .tiers import DiskTier, ExpertReadError, expert_extents, sequential_read_gbps

__all__ = ["EVICTION", "ExpertCache", "OffloadConfigError", "build_offload", "plan_slots", "DiskTier",
           "ExpertReadError", "expert_extents", "sequential_read_gbps"]
