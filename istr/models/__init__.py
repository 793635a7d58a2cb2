"""Models: timm+FPN backbone, input transform, ISTR refinement stage, the ISTR model, presets and checkpoints."""
from istr.models.backbone import Backbone, freeze_batch_norm
from istr.models.checkpoint import load_model, save_model
from istr.models.head import ISTRStage, apply_box_deltas, multiscale_roi_align
from istr.models.istr import ISTR
from istr.models.transform import ImageTransform
from istr.models.zoo import MODELS, build_istr, create_model, list_models, register_model

__all__ = ["Backbone", "ISTR", "ISTRStage", "ImageTransform", "MODELS", "apply_box_deltas", "build_istr",
           "create_model", "freeze_batch_norm", "list_models", "load_model", "multiscale_roi_align",
           "register_model", "save_model"]
