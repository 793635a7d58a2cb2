"""Models: what the families share (base, backbones and necks, the input transform, the preset registry) and the
families themselves, one folder each. A new family is a folder that registers its architecture and presets, plus
one import line below (or an import in the user's own code: nothing else names a family)."""
from istr.models.backbone import (BACKBONES, NECKS, Backbone, build_backbone, freeze_batch_norm, register_backbone,
                                  register_neck)
from istr.models.base import DetectionModel
from istr.models.transform import ImageTransform
from istr.models.zoo import (MODELS, PresetInfo, create_model, default_model, list_models, preset_info, register_model,
                             register_preset)

# the families (each registers its architecture and presets on import)
from istr.models.istr import ISTR, ISTRStage, apply_box_deltas, build_istr, multiscale_roi_align  # noqa: E402
from istr.models.isda import ISDA, build_isda  # noqa: E402

__all__ = ["BACKBONES", "Backbone", "DetectionModel", "ISDA", "ISTR", "ISTRStage", "ImageTransform", "MODELS", "NECKS",
           "PresetInfo", "apply_box_deltas", "build_backbone", "build_isda", "build_istr", "create_model",
           "default_model", "freeze_batch_norm", "list_models", "multiscale_roi_align", "preset_info",
           "register_backbone", "register_model", "register_neck", "register_preset"]
