"""Scheduling policy: cost model, priorities, best-fit packing, SLO control. No torch, no SGLang."""

from mace_sgl.policy.cost import CostModel, Observation
from mace_sgl.policy.policies import POLICIES, Policy, make_policy
from mace_sgl.policy.profile import Profile
from mace_sgl.policy.types import IterationView, Plan, Unit, WaitingPrefill

__all__ = [
    "POLICIES",
    "CostModel",
    "IterationView",
    "Observation",
    "Plan",
    "Policy",
    "Profile",
    "Unit",
    "WaitingPrefill",
    "make_policy",
]
