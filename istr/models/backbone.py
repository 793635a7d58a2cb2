"""Backbones: any timm trunk (features_only, levels picked by stride) + a registered neck (FPN, channel mapper).

The backbone contract, which the models rely on and any user backbone can meet: an nn.Module with
`out_channels` (int) and `strides` (tuple of the output maps' strides), whose forward maps images
[B, 3, H, W] (H, W multiples of the largest stride) to a list of maps [B, out_channels, H/s, W/s], one per
stride. To be rebuilt by istr.load_model it is registered (register_backbone) and has `config()` returning the
keyword arguments that rebuild it (without weights).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBN

from istr.registry import Registry

__all__ = ["BACKBONES", "NECKS", "Backbone", "ChannelMapper", "FPN", "FrozenBatchNorm2d", "build_backbone",
           "freeze_batch_norm", "register_backbone", "register_neck"]

BACKBONES = Registry("backbone", name_attr="backbone_type")
NECKS = Registry("neck")


# class decorators: a backbone class (see the module docstring) that load_model rebuilds by name (cls.backbone_type);
# a neck class `cls(in_channels: list[int], in_strides: list[int], out_channels, **kw)` with attribute `strides` (its
# output strides) and forward(list of maps) -> list of maps
register_backbone = BACKBONES.register
register_neck = NECKS.register


def build_backbone(config: dict[str, Any]) -> nn.Module:
    """A registered backbone from its config() dict ({"type": name, **kwargs}; no "type" means the timm Backbone)."""
    config = dict(config)
    return BACKBONES.get(config.pop("type", "timm"))(**config)


@register_neck("fpn")
class FPN(FeaturePyramidNetwork):
    """torchvision's FeaturePyramidNetwork (lateral 1x1 + output 3x3 convs, no norm, sum fusion), no extra level:
    one output per input level, at the same strides (ISTR: P2..P5; it never uses P6). torchvision initialises
    the convs with kaiming_uniform(a=1) and zero bias, which is detectron2's c2_xavier_fill."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int) -> None:
        super().__init__(list(in_channels), out_channels)
        self.strides = tuple(in_strides)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        return list(super().forward(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())


@register_neck("channel_mapper")
class ChannelMapper(nn.Module):
    """Deformable DETR / ISDA neck: per input level a 1x1 conv + GroupNorm (no activation, no top-down fusion),
    plus `extra_levels` 3x3 stride-2 conv + GroupNorm maps, the first from the last input (ISDA: P6 from C5).
    Output strides: the input strides, then x2 per extra level."""

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int,
                 extra_levels: int = 1, groups: int = 32, bias: bool = True, first_kaiming: bool = False) -> None:
        """bias: conv biases (ISDA's neck has none; the default keeps older model files loading); first_kaiming:
        re-initialise the first level's conv (ISDA's P2, which feeds the mask features) kaiming-normal fan_out after
        the xavier init of every conv, as ISDA's channel mapper does."""
        super().__init__()
        if out_channels % groups:
            raise ValueError(f"channel_mapper: out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.strides = tuple(in_strides) + tuple(in_strides[-1] * 2 ** (i + 1) for i in range(extra_levels))
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=bias),
                                                   nn.GroupNorm(groups, out_channels)) for c in in_channels)
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[-1] if i == 0 else out_channels, out_channels, 3, 2, 1, bias=bias),
                          nn.GroupNorm(groups, out_channels)) for i in range(extra_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if first_kaiming:
            nn.init.kaiming_normal_(self.lateral[0][0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = [conv(f) for conv, f in zip(self.lateral, feats)]
        x = feats[-1]
        for conv in self.extra:
            x = conv(x)
            outs.append(x)
        return outs


class FrozenBatchNorm2d(_TorchvisionFrozenBN):
    """torchvision.ops.FrozenBatchNorm2d (same buffers, state dict and arithmetic) with its output written once:
    x * scale, then the bias added in place into that product, where torchvision adds it into a second new tensor.
    The same values bit for bit, forward and backward (tests/models/test_backbones.py). One activation-sized tensor
    fewer per BN (~0.8 GB of allocations fewer for ResNet-50 at 800x1216): that trunk 2.55 -> 2.27 s on one CPU thread
    (benchmarks/README.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return (x * scale).add_(bias)  # the product is this op's own: x * scale + bias, one tensor fewer


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a frozen copy (statistics and affine fixed); returns the module.

    Plain BatchNorm2d becomes FrozenBatchNorm2d (torchvision's, writing its output once). timm's BatchNormAct2d (a
    BatchNorm2d that also applies its activation, used by EfficientNet) becomes timm's FrozenBatchNormAct2d, because a
    plain frozen BN would silently drop the activation.
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


@register_backbone("timm")
class Backbone(nn.Module):
    """timm feature extractor + a registered neck.

    forward(images [B, 3, H, W]) -> list of maps [B, out_channels, H/s, W/s] for s in `strides`: the neck's
    output strides (FPN: the picked levels, P2..P5 by default; channel_mapper: those plus P6).
    H and W should be multiples of the largest stride (the model's transform pads to 32).

    name: any timm model that supports features_only (resnet50, convnext_tiny, efficientnet_b0, ...).
    in_strides: the trunk levels given to the neck, the deepest feature with each stride (default 4..32).
    neck: a registered neck ("fpn", "channel_mapper"), built with neck_kwargs.
    pretrained: passed to timm (downloads ImageNet weights). checkpoint_path: a local timm-format checkpoint
    (.pth / .safetensors of the classification model) loaded through timm's pretrained machinery.
    frozen_bn: convert BatchNorm2d layers to frozen ones (ISTR/detectron2 "FrozenBN").
    freeze_at: 0 trains everything; k >= 1 freezes the stem and the first k-1 pyramid stages (detectron2's
    FREEZE_AT; ISTR v1 used 2 = stem + the stride-4 stage). It relies on timm registering parameters in
    execution order, true for the CNNs timm provides.
    """

    def __init__(self, name: str = "resnet50", *, out_channels: int = 256, pretrained: bool = False,
                 checkpoint_path: str | Path | None = None, frozen_bn: bool = False, freeze_at: int = 0,
                 in_strides: Sequence[int] = (4, 8, 16, 32), neck: str = "fpn",
                 neck_kwargs: dict[str, Any] | None = None, timm_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"backbone name must be a timm model name (str), got {type(name).__name__}")
        if not timm.is_model(name.split(".")[0]):  # "resnet50.a1_in1k": architecture + pretrained tag
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models('resnet*') for names")
        if not 0 <= int(freeze_at) <= len(in_strides):
            raise ValueError(f"freeze_at must be in [0, {len(in_strides)}], got {freeze_at}")
        self.name, self.out_channels = name, int(out_channels)
        self.in_strides = tuple(int(s) for s in in_strides)
        self.frozen_bn, self.freeze_at = bool(frozen_bn), int(freeze_at)
        self.neck_name, self.neck_kwargs = neck, dict(neck_kwargs or {})
        self.timm_kwargs = dict(timm_kwargs or {})
        kwargs = dict(self.timm_kwargs)
        if checkpoint_path is not None:
            if not Path(checkpoint_path).is_file():
                raise FileNotFoundError(f"no backbone checkpoint at {checkpoint_path}")
            pretrained = True  # timm loads `file` through its pretrained path (filters the classifier)
            kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
        if pretrained and checkpoint_path is None:  # fail in seconds, with what to do, where the hub is unreachable
            from istr.hub import pretrained_weights_access

            with pretrained_weights_access(name):
                self.body = timm.create_model(name, pretrained=True, features_only=True, **kwargs)
        else:
            self.body = timm.create_model(name, pretrained=pretrained, features_only=True, **kwargs)

        info = self.body.feature_info
        reductions, channels = list(info.reduction()), list(info.channels())
        self.level_indices = []
        for stride in self.in_strides:  # the deepest feature with each wanted stride
            found = [i for i, r in enumerate(reductions) if r == stride]
            if not found:
                raise ValueError(f"timm model {name!r} has no feature with stride {stride}; its strides are {reductions}")
            self.level_indices.append(found[-1])
        self.in_channels = [channels[i] for i in self.level_indices]
        self._level_modules = [info.module_name()[i] for i in self.level_indices]

        if frozen_bn:
            freeze_batch_norm(self.body)
        self.freeze_stages(self.freeze_at)
        self.neck = NECKS.get(neck)(self.in_channels, self.in_strides, self.out_channels, **self.neck_kwargs)
        self.strides = tuple(self.neck.strides)

    def freeze_stages(self, freeze_at: int) -> None:
        """Stop gradients to the stem and the first freeze_at - 1 pyramid stages (0: nothing frozen)."""
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
        return {"type": "timm", "name": self.name, "out_channels": self.out_channels, "frozen_bn": self.frozen_bn,
                "freeze_at": self.freeze_at, "in_strides": list(self.in_strides), "neck": self.neck_name,
                "neck_kwargs": self.neck_kwargs, "timm_kwargs": self.timm_kwargs}

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(images)
        return self.neck([feats[j] for j in self.level_indices])
