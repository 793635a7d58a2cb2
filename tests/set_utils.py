"""Helpers shared by the matcher and loss tests: random boxes and a hand-written GIoU reference."""
from __future__ import annotations

import torch


def rand_boxes(n: int, g: torch.Generator, h: float = 60.0, w: float = 80.0) -> torch.Tensor:
    """n random xyxy boxes (at least 2 px wide and high) inside a w x h image."""
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
    return torch.cat([xy, xy + wh], 1)


def hand_giou(a, b) -> float:
    """Generalised IoU of two xyxy boxes, in plain Python arithmetic (independent of torchvision)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull
