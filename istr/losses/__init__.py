"""Losses: loss-term registry, SetCriterion (per-stage matching, deep supervision) and target preparation."""
from istr.losses.criterion import DEFAULT_LOSSES, SetCriterion, count_boxes, criterion_config, criterion_from_config
from istr.losses.terms import LOSSES, register_loss

__all__ = ["DEFAULT_LOSSES", "LOSSES", "SetCriterion", "count_boxes", "criterion_config", "criterion_from_config",
           "register_loss"]
