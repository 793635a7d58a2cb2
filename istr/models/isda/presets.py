"""ISDA's builder and named presets: the authors' isda_r50 and the CPU-sized isda_tiny, each with its recipe."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from istr.models.isda.model import ISDA, ISDA_COSTS, ISDA_LOSSES
from istr.models.zoo import backbone_from_options, build_criterion, register_preset

__all__ = ["build_isda", "ISDA_RECIPE"]


def build_isda(*, num_classes: int = 80, pretrained: bool = False, backbone: str | nn.Module = "resnet50",
               checkpoint_path: str | None = None, frozen_bn: bool = False, freeze_at: int = 0,
               timm_kwargs: Mapping[str, Any] | None = None, matcher: nn.Module | None = None,
               criterion: nn.Module | None = None, costs: Mapping[str, float] | None = None,
               losses: Mapping[str, float] | None = None, codec: None = None,
               neck_options: Mapping[str, Any] | None = None, **model_kwargs: Any) -> ISDA:
    """Assemble backbone (timm + channel mapper with P6), matcher/criterion (ISDA_COSTS, ISDA_LOSSES) and ISDA.
    neck_options: channel mapper options (default: the authors', no conv bias and P2 kaiming fan_out).
    codec: accepted only as None (a caller passing the same keywords to every family); ISDA has no codec."""
    if codec is not None or "codec_config" in model_kwargs:
        raise ValueError("ISDA predicts masks directly and takes no codec (codec= / codec_config=)")
    groups = model_kwargs.get("num_groups", 32)
    # the authors' channel mapper: no conv bias, P2's conv kaiming fan_out (neck_options={} for PyTorch's defaults)
    neck_kwargs = {"groups": groups, **({"bias": False, "first_kaiming": True} if neck_options is None else neck_options)}
    neck = {} if not isinstance(backbone, str) else {"neck": "channel_mapper", "neck_kwargs": neck_kwargs}
    backbone = backbone_from_options(backbone, out_channels=model_kwargs.get("hidden_dim", 256), pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, frozen_bn=frozen_bn, freeze_at=freeze_at,
                                     timm_kwargs=timm_kwargs, **neck)
    criterion = build_criterion(num_classes, matcher, criterion, costs, losses, ISDA_COSTS, ISDA_LOSSES)
    return ISDA(backbone, num_classes, criterion=criterion, **model_kwargs)


# The reference recipe (isda_r50_3x_coco): AdamW lr 1.25e-4, weight decay 1e-4, backbone, sampling offsets and
# reference points at lr x 0.1, gradient norm clipped to 0.1, no warmup; 42 epochs of COCO train2017 at 16 images
# per step (7,329 steps an epoch), lr x 0.1 at epochs 27, 33, 35, 36 and 37: train it with max_iters=42 * 7329
# (the run's length is the user's budget, not part of the recipe).
_EPOCH = 7329
ISDA_RECIPE: dict[str, Any] = dict(lr=1.25e-4, weight_decay=1e-4, backbone_lr_mult=0.1, clip_grad_norm=0.1,
                                   warmup_iters=0, lr_multipliers={"sampling_offsets": 0.1, "reference_points": 0.1},
                                   milestones=tuple(e * _EPOCH for e in (27, 33, 35, 36, 37)))

# ISDA (reference config isda_r50_3x_coco): ResNet-50 with FrozenBN and stage 1 frozen, channel mapper (P2..P6,
# GN 32), deformable transformer 6 + 6 layers, 256-d, 8 heads, 4 levels x 4 points, FFN 1024, dropout 0.1,
# 300 queries, MFR 128 -> 256 at 1/4 with coordinates, 256-d position-aware kernels; DETR multi-scale training.
register_preset("isda_r50", build_isda, family="isda", recipe=ISDA_RECIPE, backbone="resnet50", frozen_bn=True,
                freeze_at=2, train_min_sizes=tuple(range(480, 801, 32)))

# The demo's settings for isda_tiny (istr.demo; benchmarks/results/isda_demo_levers.md): the demo's images at their own
# size, 20 queries, the mask-RoI class term (without it the queries found the masks but not the classes), masks at
# stride 2 from an MFR with an image branch (its small objects need detail finer than P2's), the queries fed their
# masks' features and reference points moved to their masks between decoder layers. None of these is in ISDA. Its
# schedule: 2,400 steps with the lr decay at 80% (ISDA was still climbing at ISTR's 65% of 2,100; its step is the
# cheaper one since the mask-RoI features went through the library's RoIAlign, so the wall clock stays ~12 min).
ISDA_DEMO = {"model": dict(num_queries=20, train_min_sizes=None, detections_per_image=50, mask_roi_class=True,
                           mask_stride=2, mask_image_channels=16, mask_feedback=True, mask_reference=True),
             "train": dict(lr=5e-4, backbone_lr_mult=0.4, batch_size=8, iters=2400, warmup_iters=50, decay_at=0.8,
                           gamma=0.1, clip_grad_norm=1.0, flip=True),
             "description": "ISDA (`{preset}`: ResNet-18{width} with a channel mapper, deformable transformer, "
                            "{num_queries} queries, masks at stride {mask_stride} with an image branch, a mask-RoI "
                            "class term, masks fed back between decoder layers)"}
# CPU-sized: ResNet-18, 64-d, 2 + 2 layers, 4 heads, 30 queries, MFR 32 -> 64 (tests, examples, the demo)
register_preset("isda_tiny", build_isda, family="isda", recipe=ISDA_RECIPE, demo=ISDA_DEMO, backbone="resnet18",
                frozen_bn=False, freeze_at=0, hidden_dim=64, num_queries=30, num_encoder_layers=2, num_decoder_layers=2,
                num_heads=4, ffn_dim=256, dropout=0.0, mask_feat_dim=32, kernel_dim=64, num_groups=8,
                detections_per_image=50, min_size=320, max_size=512, train_min_sizes=(256, 288, 320, 352))
