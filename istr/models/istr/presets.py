"""ISTR's builder and named presets (the paper's R50/R101 PCA-60, codec variants, v2 style, the CPU-sized tiny one)."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from istr.codecs import MaskCodec, create_codec
from istr.models.istr.model import ISTR
from istr.models.zoo import backbone_from_options, build_criterion, register_model

__all__ = ["build_istr", "HALF_WIDTH_RESNET18"]


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
    criterion = build_criterion(num_classes, matcher, criterion, costs, losses)
    return ISTR(backbone, codec, num_classes, criterion=criterion, **model_kwargs)


def _preset(name: str, *, demo: Mapping[str, Any] | None = None, default: bool = False, **defaults: Any) -> None:
    """Register an ISTR preset whose defaults any create_model keyword overrides."""

    def fn(num_classes: int = 80, pretrained: bool = False, **overrides: Any) -> ISTR:
        if overrides.get("codec") is not None and "codec_config" in overrides:
            raise ValueError("pass either codec= (a built codec) or codec_config= (for the preset's codec), not both")
        return build_istr(num_classes=num_classes, pretrained=pretrained, **{**defaults, **overrides})

    fn.defaults = defaults
    fn.__doc__ = f"ISTR preset {name!r}: " + ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    # ISTR's recipe is the library's defaults (TrainConfig): the paper's AdamW 2.5e-5, warmup, clip 1.0
    register_model(name, family="istr", recipe={}, demo=demo, default=default)(fn)


# v1 PCA codec: l=60 on 28x28 GT-box crops, whitened, fitted in logit space (MEInst soft inverse-sigmoid)
_PCA60 = {"mask_size": 28, "dim": 60, "whiten": True, "logit_space": True}
# the paper's R50/R101 setting: FrozenBN, stem + res2 frozen (detectron2 FREEZE_AT=2, ISTR v1)
_PAPER = dict(frozen_bn=True, freeze_at=2)

# The demo's settings (istr.demo; benchmarks/README.md holds the experiments behind them): istr_tiny at the image
# size with 10 queries (1-4 objects per image), 4 denoising groups and a half-width ResNet-18 (32-256 channels):
# cheaper steps that also learn faster per step from random weights than 20 queries on the full width. With
# ImageNet or checkpoint weights the demo keeps the full-width ResNet-18 those weights are for.
HALF_WIDTH_RESNET18: dict[str, Any] = {"channels": [32, 64, 128, 256], "stem_width": 32}  # timm_kwargs
DEMO_TRAIN: dict[str, Any] = dict(lr=5e-4, backbone_lr_mult=0.4, batch_size=8, iters=2100, warmup_iters=50,
                                  decay_at=0.65, gamma=0.1, clip_grad_norm=1.0, flip=True)
ISTR_DEMO = {"model": dict(num_queries=10, train_min_sizes=None, detections_per_image=50, denoising_groups=4,
                           timm_kwargs=HALF_WIDTH_RESNET18),
             "train": DEMO_TRAIN,
             "description": "ISTR (`{preset}`: ResNet-18{width} FPN, {num_queries} queries, 3 stages, PCA-60 codec on "
                            "28x28 box crops, {denoising_groups} denoising groups)"}

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
        detections_per_image=50, min_size=320, max_size=512, train_min_sizes=(256, 288, 320, 352),
        demo=ISTR_DEMO, default=True)
