"""Backbone: any timm model (features_only, the levels with strides 4, 8, 16, 32) + torchvision FPN."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

__all__ = ["Backbone", "freeze_batch_norm"]


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a frozen copy (statistics and affine fixed); returns the module.

    Plain BatchNorm2d becomes torchvision.ops.FrozenBatchNorm2d. timm's BatchNormAct2d (a BatchNorm2d that
    also applies its activation, used by EfficientNet) becomes timm's FrozenBatchNormAct2d, because a plain
    frozen BN would silently drop the activation.
    """
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    if isinstance(module, BatchNormAct2d):
        frozen = FrozenBatchNormAct2d(module.num_features, eps=module.eps, apply_act=True)
        frozen.act, frozen.drop = module.act, module.drop
    elif isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
    else:
        for name, child in module.named_children():
            new = freeze_batch_norm(child)
            if new is not child:
                setattr(module, name, new)
        return module
    with torch.no_grad():
        if module.affine:
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
        if module.track_running_stats and module.running_mean is not None:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
    return frozen


class Backbone(nn.Module):
    """timm feature extractor + FeaturePyramidNetwork.

    forward(images [B, 3, H, W]) -> list of 4 maps [B, out_channels, H/s, W/s] for s in `strides` (P2..P5).
    H and W should be multiples of the largest stride (the model's transform pads to 32).

    name: any timm model that supports features_only (resnet50, convnext_tiny, efficientnet_b0, ...).
    pretrained: passed to timm (downloads ImageNet weights). checkpoint_path: a local timm-format checkpoint
    (.pth / .safetensors of the classification model) loaded through timm's pretrained machinery.
    frozen_bn: convert BatchNorm2d layers to frozen ones (ISTR/detectron2 "FrozenBN").
    freeze_at: 0 trains everything; k >= 1 freezes the stem and the first k-1 pyramid stages (detectron2's
    FREEZE_AT; ISTR v1 used 2 = stem + the stride-4 stage). It relies on timm registering parameters in
    execution order, true for the CNNs timm provides.
    """

    def __init__(self, name: str = "resnet50", *, out_channels: int = 256, pretrained: bool = False,
                 checkpoint_path: str | Path | None = None, frozen_bn: bool = False, freeze_at: int = 0,
                 strides: Sequence[int] = (4, 8, 16, 32), timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"backbone name must be a timm model name (str), got {type(name).__name__}")
        if not timm.is_model(name.split(".")[0]):  # "resnet50.a1_in1k": architecture + pretrained tag
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models('resnet*') for names")
        if not 0 <= int(freeze_at) <= len(strides):
            raise ValueError(f"freeze_at must be in [0, {len(strides)}], got {freeze_at}")
        self.name, self.out_channels, self.strides = name, int(out_channels), tuple(int(s) for s in strides)
        self.frozen_bn, self.freeze_at = bool(frozen_bn), int(freeze_at)
        self.timm_kwargs = dict(timm_kwargs or {})
        kwargs = dict(self.timm_kwargs)
        if checkpoint_path is not None:
            if not Path(checkpoint_path).is_file():
                raise FileNotFoundError(f"no backbone checkpoint at {checkpoint_path}")
            pretrained = True  # timm loads `file` through its pretrained path (filters the classifier)
            kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
        self.body = timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)

        info = self.body.feature_info
        reductions, channels = list(info.reduction()), list(info.channels())
        self.level_indices = []
        for stride in self.strides:  # the deepest feature with each wanted stride
            found = [i for i, r in enumerate(reductions) if r == stride]
            if not found:
                raise ValueError(f"timm model {name!r} has no feature with stride {stride}; its strides are {reductions}")
            self.level_indices.append(found[-1])
        self.in_channels = [channels[i] for i in self.level_indices]
        self._level_modules = [info.module_name()[i] for i in self.level_indices]

        if frozen_bn:
            freeze_batch_norm(self.body)
        self._freeze_stages(self.freeze_at)
        # extra_blocks=None: ISTR never uses P6. torchvision initialises the FPN convs with kaiming_uniform(a=1)
        # and zero bias, which is detectron2's c2_xavier_fill.
        self.fpn = FeaturePyramidNetwork(self.in_channels, self.out_channels)

    def _freeze_stages(self, freeze_at: int) -> None:
        if freeze_at == 0:
            return
        boundary = self._level_modules[freeze_at - 1]  # the first module left trainable
        prefixes = (boundary + ".", boundary.replace(".", "_") + ".")
        for pname, param in self.body.named_parameters():
            if pname.startswith(prefixes):
                return
            param.requires_grad_(False)

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this backbone (without weights: pretrained=False)."""
        return {"name": self.name, "out_channels": self.out_channels, "frozen_bn": self.frozen_bn,
                "freeze_at": self.freeze_at, "strides": list(self.strides), "timm_kwargs": self.timm_kwargs}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(images)
        picked = OrderedDict((str(i), feats[j]) for i, j in enumerate(self.level_indices))
        return list(self.fpn(picked).values())
