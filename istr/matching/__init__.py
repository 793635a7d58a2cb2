"""Matching: cost-term registry and the per-image HungarianMatcher."""
from istr.matching.costs import COSTS, register_cost
from istr.matching.matcher import DEFAULT_COSTS, HungarianMatcher

__all__ = ["COSTS", "DEFAULT_COSTS", "HungarianMatcher", "register_cost"]
