"""The ISTR family: K query boxes refined over N stages, mask embeddings decoded by a fixed codec (Hu et al. 2021)."""
from istr.models.istr.head import ISTRStage, apply_box_deltas, multiscale_roi_align
from istr.models.istr.model import ISTR
from istr.models.istr.presets import build_istr

__all__ = ["ISTR", "ISTRStage", "apply_box_deltas", "build_istr", "multiscale_roi_align"]
