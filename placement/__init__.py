"""moeyard.placement: place MoE experts on workers so consecutive-layer choices stay together.

Pure numpy/scipy/HiGHS. Glossary and shapes: see each module's docstring
(trace -> affinity -> solver/ilp/search/bounds -> Placement -> evaluate/simulate).
"""
from .affinity import affinity_from_counts, affinity_from_trace, load_routing_stats
from .errors import PlacementError
from .evaluate import Metrics, evaluate
from .layout import ModelLayout
from .placement import Placement
from .policies import BASELINES, POLICIES, get_policy, register_policy
from .problem import AffinityProblem
from .rebalance import Move, Proposal, RebalanceConfig, propose
from .simulate import SimResult, simulate
from .solver import SolveResult, solve
from .spec import PlaceSpec
from .topology import Topology
from .trace import Trace, load_trace, save_trace, split_tokens

__all__ = [
    "AffinityProblem", "BASELINES", "Metrics", "ModelLayout", "Move", "POLICIES", "PlaceSpec", "Placement",
    "PlacementError", "Proposal", "RebalanceConfig", "SimResult", "SolveResult", "Topology", "Trace",
    "affinity_from_counts", "affinity_from_trace", "evaluate", "get_policy", "load_routing_stats", "load_trace",
    "propose", "register_policy", "save_trace", "simulate", "solve", "split_tokens",
]
