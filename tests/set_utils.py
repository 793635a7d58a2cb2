"""Helpers shared by the tests: random boxes, a hand-written GIoU reference, soft random mask grids."""
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


def blobs(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """Soft random ellipses [n, m, m] in [0, 1] (cheap synthetic grids for contract tests)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, m), torch.linspace(-1, 1, m), indexing="ij")
    c = torch.rand(n, 2, generator=g) * 0.6 - 0.3
    r = torch.rand(n, 2, generator=g) * 0.6 + 0.4
    d = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
    return torch.sigmoid((1 - d) * 8)
