"""Model zoo: named presets of both families (timm style) - register_model, create_model, list_models."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from istr.codecs import MaskCodec, create_codec
from istr.losses import SetCriterion
from istr.matching import HungarianMatcher
from istr.models.backbone import Backbone, freeze_batch_norm
from istr.models.isda import ISDA, ISDA_COSTS, ISDA_LOSSES
from istr.models.istr import ISTR
from istr.registry import Registry

__all__ = ["MODELS", "register_model", "create_model", "list_models", "build_istr", "build_isda",
           "backbone_from_options"]

MODELS = Registry("model")


def register_model(name: str) -> Callable:
    """Decorator registering a preset `fn(num_classes=80, pretrained=False, **overrides) -> model`."""
    return MODELS.register(name)


def backbone_from_options(backbone: str | nn.Module, *, out_channels: int, pretrained: bool = False,
                          checkpoint_path: str | None = None, frozen_bn: bool = False, freeze_at: int = 0,
                          timm_kwargs: Mapping[str, Any] | None = None, **neck: Any) -> nn.Module:
    """The backbone a preset asks for: a timm name builds istr.models.Backbone with these options; a module is
    used as given, with the options applied where they can be (frozen_bn freezes its BatchNorms, freeze_at calls
    its freeze_stages(k)) and a ValueError for those that cannot (never silently dropped)."""
    if isinstance(backbone, str):
        return Backbone(backbone, out_channels=out_channels, pretrained=pretrained, checkpoint_path=checkpoint_path,
                        frozen_bn=frozen_bn, freeze_at=freeze_at, timm_kwargs=dict(timm_kwargs or {}), **neck)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}")
    for key in ("out_channels", "strides"):
        if not hasattr(backbone, key):
            raise TypeError(f"a backbone module must expose `{key}` (the backbone contract: out_channels, strides, "
                            f"forward -> one map per stride; see istr.models.backbone); {type(backbone).__name__} "
                            "does not")
    rejected = {k: v for k, v in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path),
                                  ("timm_kwargs", timm_kwargs), *neck.items()) if v}
    if rejected:
        raise ValueError(f"{sorted(rejected)} configure a timm backbone built by name; the given backbone module "
                         f"({type(backbone).__name__}) must be configured by you")
    if frozen_bn:
        freeze_batch_norm(backbone)
    if freeze_at:
        if not callable(getattr(backbone, "freeze_stages", None)):
            raise ValueError(f"this preset freezes the first stages (freeze_at={freeze_at}) but the given backbone "
                             f"module ({type(backbone).__name__}) has no freeze_stages(k): pass freeze_at=0, or "
                             "give it that method")
        backbone.freeze_stages(freeze_at)
    return backbone


def create_model(name: str, num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered preset of either family, e.g. create_model("istr_r50_fpn_pca60", codec=my_pca,
    num_queries=100) or create_model("isda_r50", num_classes=80).

    pretrained: ImageNet backbone weights through timm (needs the network). overrides: any keyword of the
    model (ISTR: num_queries, num_stages, attention, mask_head, min_size, ...; ISDA: num_queries, mask_stride,
    mask_position, kernel_position, ...), backbone keywords (backbone="convnext_tiny" or a module,
    checkpoint_path, frozen_bn, freeze_at, timm_kwargs), matcher=/criterion= modules or costs=/losses= weight
    dicts. ISTR also takes codec= (a MaskCodec; without it the preset's codec is built UNFITTED: fit it with
    model.codec.fit(grids), or pass a fitted/loaded one) or codec_config={...} for the preset's codec.
    """
    return MODELS.get(name)(num_classes=num_classes, pretrained=pretrained, **overrides)


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
    if codec is None:
        codec = create_codec(codec_name, **dict(codec_config or {}))
    backbone = backbone_from_options(backbone, out_channels=model_kwargs.get("hidden_dim", 256), pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, frozen_bn=frozen_bn, freeze_at=freeze_at,
                                     timm_kwargs=timm_kwargs)
    criterion = _criterion(num_classes, matcher, criterion, costs, losses, costs is not None or losses is not None)
    return ISTR(backbone, codec, num_classes, criterion=criterion, **model_kwargs)


def build_isda(*, num_classes: int = 80, pretrained: bool = False, backbone: str | nn.Module = "resnet50",
               checkpoint_path: str | None = None, frozen_bn: bool = False, freeze_at: int = 0,
               timm_kwargs: Mapping[str, Any] | None = None, matcher: nn.Module | None = None,
               criterion: nn.Module | None = None, costs: Mapping[str, float] | None = None,
               losses: Mapping[str, float] | None = None, **model_kwargs: Any) -> ISDA:
    """Assemble backbone (timm + channel mapper with P6), matcher/criterion (ISDA_COSTS, ISDA_LOSSES) and ISDA."""
    groups = model_kwargs.get("num_groups", 32)
    neck = {} if not isinstance(backbone, str) else {"neck": "channel_mapper", "neck_kwargs": {"groups": groups}}
    backbone = backbone_from_options(backbone, out_channels=model_kwargs.get("hidden_dim", 256), pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, frozen_bn=frozen_bn, freeze_at=freeze_at,
                                     timm_kwargs=timm_kwargs, **neck)
    criterion = _criterion(num_classes, matcher, criterion, ISDA_COSTS if costs is None else costs,
                           ISDA_LOSSES if losses is None else losses, costs is not None or losses is not None)
    return ISDA(backbone, num_classes, criterion=criterion, **model_kwargs)


def _criterion(num_classes: int, matcher, criterion, costs, losses, weights_given: bool) -> nn.Module:
    if criterion is not None:
        if matcher is not None or weights_given:
            raise ValueError("pass either criterion= or matcher=/costs=/losses= (they configure the criterion it builds)")
        return criterion
    return SetCriterion(matcher if matcher is not None else HungarianMatcher(costs), losses, num_classes=num_classes)


def _preset(name: str, builder: Callable = None, **defaults: Any) -> Callable:
    """Register a preset whose defaults any create_model keyword overrides (builder: build_istr or build_isda)."""
    builder = builder or build_istr

    def preset(num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> nn.Module:
        kwargs = {**defaults, **overrides}
        if overrides.get("codec") is not None and "codec_config" in overrides:
            raise ValueError("pass either codec= (a built codec) or codec_config= (for the preset's codec), not both")
        if builder is build_isda and (overrides.get("codec") is not None or "codec_config" in overrides):
            raise ValueError(f"{name} is an ISDA model: it predicts masks directly and takes no codec")
        if builder is build_isda:
            kwargs.pop("codec", None)  # codec=None: a caller passing the same keywords to either family
        model = builder(num_classes=num_classes, pretrained=pretrained, **kwargs)
        model.preset = name
        return model

    preset.__name__ = name
    family = "ISDA" if builder is build_isda else "ISTR"
    preset.__doc__ = f"{family} preset {name!r}: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items())
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


# ISDA (reference config isda_r50_3x_coco): ResNet-50 with FrozenBN and stage 1 frozen, channel mapper (P2..P6,
# GN 32), deformable transformer 6 + 6 layers, 256-d, 8 heads, 4 levels x 4 points, FFN 1024, dropout 0.1,
# 300 queries, MFR 128 -> 256 at 1/4 with coordinates, 256-d position-aware kernels; DETR multi-scale training.
# Train it with the reference recipe: TrainConfig(lr=1.25e-4, weight_decay=1e-4, clip_grad_norm=0.1,
# backbone_lr_mult=0.1) (sampling offsets and reference points at lr x 0.1 come with the model).
_preset("isda_r50", build_isda, backbone="resnet50", frozen_bn=True, freeze_at=2,
        train_min_sizes=tuple(range(480, 801, 32)))
# CPU-sized: ResNet-18, 64-d, 2 + 2 layers, 4 heads, 30 queries, MFR 32 -> 64 (tests, examples, the demo)
_preset("isda_tiny", build_isda, backbone="resnet18", frozen_bn=False, freeze_at=0, hidden_dim=64, num_queries=30,
        num_encoder_layers=2, num_decoder_layers=2, num_heads=4, ffn_dim=256, dropout=0.0, mask_feat_dim=32,
        mask_dim=64, num_groups=8, detections_per_image=50, min_size=320, max_size=512,
        train_min_sizes=(256, 288, 320, 352))
