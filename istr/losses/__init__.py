"""Losses: loss-term registry and SetCriterion (per-stage matching, deep supervision)."""
from istr.losses.criterion import DEFAULT_LOSSES, SetCriterion, count_boxes
from istr.losses.terms import LOSSES, register_loss

__all__ = ["DEFAULT_LOSSES", "LOSSES", "SetCriterion", "count_boxes", "register_loss"]
