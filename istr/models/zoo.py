"""Model zoo: named presets (timm style) - register_model, create_model, list_models."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from istr.codecs import MaskCodec, create_codec
from istr.models.backbone import Backbone
from istr.models.istr import ISTR
from istr.registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models", "build_istr", "BACKBONE_KEYS"]

MODELS = Registry("model")

# create_model/build_istr keywords that configure the Backbone rather than the ISTR module
BACKBONE_KEYS = ("backbone", "checkpoint_path", "frozen_bn", "freeze_at", "timm_kwargs")


def register_model(name: str) -> Callable:
    """Decorator registering a preset `fn(num_classes=80, codec=None, pretrained=False, **overrides) -> ISTR`."""
    return MODELS.register(name)


def create_model(name: str, num_classes: int = 80, codec: MaskCodec | None = None, pretrained: bool = False,
                 **overrides: Any) -> ISTR:
    """Build a registered preset, e.g. create_model("istr_r50_fpn_pca60", codec=my_pca, num_queries=100).

    codec: a MaskCodec; None builds the preset's codec UNFITTED (fit it with model.codec.fit(grids), or pass
    a fitted/loaded one). pretrained: ImageNet backbone weights through timm (needs the network).
    overrides: any ISTR keyword (num_queries, num_stages, attention, mask_head, min_size, ...), backbone keywords
    (backbone="convnext_tiny", checkpoint_path, frozen_bn, freeze_at, timm_kwargs), codec_config={...} for the
    default codec, and matcher=/criterion= modules or costs=/losses= weight dicts.
    """
    return MODELS.get(name)(num_classes=num_classes, codec=codec, pretrained=pretrained, **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered preset names matching a wildcard, e.g. list_models("istr_r50*")."""
    return MODELS.list(pattern)


def build_istr(*, num_classes: int = 80, codec: MaskCodec | None = None, codec_name: str = "pca",
               codec_config: Mapping[str, Any] | None = None, pretrained: bool = False,
               backbone: str | nn.Module = "resnet50", checkpoint_path: str | None = None, frozen_bn: bool = False,
               freeze_at: int = 0, timm_kwargs: Mapping[str, Any] | None = None,
               matcher: nn.Module | None = None, criterion: nn.Module | None = None,
               costs: Mapping[str, float] | None = None, losses: Mapping[str, float] | None = None,
               **model_kwargs: Any) -> ISTR:
    """Assemble backbone (timm + FPN of hidden_dim channels), codec, matcher/criterion and the ISTR module."""
    from istr.losses import SetCriterion
    from istr.matching import HungarianMatcher

    if codec is None:
        codec = create_codec(codec_name, **dict(codec_config or {}))
    hidden_dim = model_kwargs.get("hidden_dim", 256)
    if isinstance(backbone, str):
        backbone = Backbone(backbone, out_channels=hidden_dim, pretrained=pretrained, checkpoint_path=checkpoint_path,
                            frozen_bn=frozen_bn, freeze_at=freeze_at, timm_kwargs=dict(timm_kwargs or {}))
    if criterion is None:
        if matcher is None:
            matcher = HungarianMatcher(costs)
        criterion = SetCriterion(matcher, losses, num_classes=num_classes)
    elif matcher is not None or costs is not None or losses is not None:
        raise ValueError("pass either criterion= or matcher=/costs=/losses= (they configure the criterion it builds)")
    return ISTR(backbone, codec, num_classes, criterion=criterion, **model_kwargs)


def _preset(name: str, **defaults: Any) -> Callable:
    """Register a preset whose defaults any create_model keyword overrides."""

    def preset(num_classes: int = 80, codec: MaskCodec | None = None, pretrained: bool = False,
               **overrides: Any) -> ISTR:
        kwargs = {**defaults, **overrides}
        if codec is not None and "codec_config" in overrides:
            raise ValueError("pass either codec= (a built codec) or codec_config= (for the preset's codec), not both")
        model = build_istr(num_classes=num_classes, codec=codec, pretrained=pretrained, **kwargs)
        model.preset = name
        return model

    preset.__name__ = name
    preset.__doc__ = f"ISTR preset {name!r}: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    return register_model(name)(preset)


# v1 PCA codec: l=60 on 28x28 GT-box crops, whitened, fitted in logit space (MEInst soft inverse-sigmoid)
_PCA60 = {"mask_size": 28, "dim": 60, "whiten": True, "logit_space": True}
# the paper's R50/R101 setting: FrozenBN, stem + res2 frozen (detectron2 FREEZE_AT=2, ISTR v1)
_PAPER = dict(frozen_bn=True, freeze_at=2)

_preset("istr_r50_fpn_pca60", backbone="resnet50", codec_name="pca", codec_config=_PCA60, **_PAPER)
_preset("istr_r101_fpn_pca60", backbone="resnet101", codec_name="pca", codec_config=_PCA60, **_PAPER)
_preset("istr_r50_fpn_dct60", backbone="resnet50", codec_name="dct", codec_config={"mask_size": 28, "dim": 60},
        **_PAPER)
_preset("istr_r50_fpn_ae60", backbone="resnet50", codec_name="autoencoder",
        codec_config={"mask_size": 28, "dim": 60}, **_PAPER)
# v2 (HEAD) style: RoI-conv mask head, 112x112 DCT-256, stage-averaged logits, nothing frozen
_preset("istr_r50_fpn_dct256_v2", backbone="resnet50", codec_name="dct", codec_config={"mask_size": 112, "dim": 256},
        mask_head="roi_conv", stage_logit_average=True, mask_threshold=0.45, frozen_bn=True, freeze_at=0,
        train_min_sizes=tuple(range(416, 1089, 32)), losses={"focal": 2, "l1": 5, "giou": 2, "embed_smooth_l1": 1,
                                                             "dice": 5}, costs={"focal": 2, "l1": 5, "giou": 2, "cosine": 1})
# CPU-friendly: ResNet-18, 128-d head, 50 queries, 3 stages, ~320 px images (a 10-minute CPU demo)
_preset("istr_tiny", backbone="resnet18", codec_name="pca", codec_config=_PCA60, frozen_bn=False, freeze_at=0,
        num_queries=50, num_stages=3, hidden_dim=128, dynamic_dim=32, ffn_dim=512, num_heads=4,
        detections_per_image=50, min_size=320, max_size=512, train_min_sizes=(256, 288, 320, 352))
