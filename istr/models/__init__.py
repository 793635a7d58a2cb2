"""Models: backbones and necks, the input transform, the ISTR and ISDA families, and their named presets."""
from istr.models.backbone import (BACKBONES, NECKS, Backbone, build_backbone, freeze_batch_norm, register_backbone,
                                  register_neck)
from istr.models.head import ISTRStage, apply_box_deltas, multiscale_roi_align
from istr.models.isda import ISDA
from istr.models.istr import ISTR
from istr.models.transform import ImageTransform
from istr.models.zoo import MODELS, build_isda, build_istr, create_model, list_models, register_model

__all__ = ["BACKBONES", "Backbone", "ISDA", "ISTR", "ISTRStage", "ImageTransform", "MODELS", "NECKS", "apply_box_deltas",
           "build_backbone", "build_isda", "build_istr", "create_model", "freeze_batch_norm", "list_models", "multiscale_roi_align",
           "register_backbone", "register_model", "register_neck"]
