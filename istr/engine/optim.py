"""The optimizer of a run: parameter groups (head, backbone, lr_multipliers), AdamW, and the lr schedule."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from istr.engine.config import TrainConfig, warmup_multistep_factor

__all__ = ["lr_multipliers", "param_groups", "build_optimizer", "build_scheduler"]


def lr_multipliers(module: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """cfg.lr_multipliers (resolved: given, or the model's recipe), else the model's `lr_multipliers` attribute."""
    mults = cfg.lr_multipliers
    return dict(getattr(module, "lr_multipliers", None) or {} if mults is None else mults)


def _backbone_test(module: nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name is in the backbone lr group: model.backbone_lr_names() when the model defines it,
    else names starting with "backbone."."""
    names_fn = getattr(module, "backbone_lr_names", None)
    if callable(names_fn):
        names = set(names_fn())
        return names.__contains__
    return lambda name: name.startswith("backbone.")


def param_groups(module: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Parameter groups, each {"params", "lr", "name"}: the head at lr, the backbone at lr x backbone_lr_mult,
    and one group per lr_multipliers entry (the first matching substring wins). cfg must be resolved."""
    mults, in_backbone = lr_multipliers(module, cfg), _backbone_test(module)
    groups: dict[str, dict[str, Any]] = {"head": {"params": [], "lr": cfg.lr, "name": "head"}}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in mults if k in name), None)
        if key is not None:
            group = groups.setdefault(key, {"params": [], "lr": cfg.lr * mults[key], "name": key})
        elif in_backbone(name):
            group = groups.setdefault("backbone", {"params": [], "lr": cfg.lr * cfg.backbone_lr_mult,
                                                   "name": "backbone"})
        else:
            group = groups["head"]
        group["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(module: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over param_groups, weight decay on every parameter (norms and biases included, as the reference
    code). fused: one kernel for all parameters where torch has it for `device` (same update rule)."""
    groups = param_groups(module, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=_fused_adamw_supported(device))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg_getter: Callable[[], TrainConfig]):
    """LambdaLR of warmup_multistep_factor, reading the config at every step (callbacks and resumes may move
    milestones)."""
    def factor(iteration: int) -> float:
        c = cfg_getter()
        return warmup_multistep_factor(iteration, c.warmup_iters, c.warmup_factor, c.milestones, c.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel exists for this device (CPU since torch 2.4; CUDA; not MPS before 2.5)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()
