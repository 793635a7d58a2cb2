"""The ISDA family: a deformable DETR decoder whose queries give class logits and dynamic 1x1 kernels over a shared
mask feature map (Ying et al., ICASSP 2022)."""
from istr.models.isda.model import ISDA, ISDA_COSTS, ISDA_LOSSES
from istr.models.isda.presets import ISDA_RECIPE, build_isda

__all__ = ["ISDA", "ISDA_COSTS", "ISDA_LOSSES", "ISDA_RECIPE", "build_isda"]
