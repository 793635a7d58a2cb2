"""Training targets in the torchvision detection format, validated once for every family.

Per image {"boxes": float [N, 4] absolute xyxy in original pixels, "labels": int64 [N] in [0, C), "masks":
uint8/bool [N, H, W] 0/1 (or float in [0, 1]) full-image masks}. `check_targets` rejects what would train silently
wrong; each family turns checked targets into what its cost and loss terms read (its own targets.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["check_targets"]


def check_targets(targets: Any, image_sizes: Sequence[tuple[int, int]], num_classes: int) -> None:
    """ValueError/TypeError naming the image and what is wrong: keys, dtypes, shapes, labels out of range,
    non-finite boxes, boxes with x2 <= x1 or y2 <= y1, boxes entirely outside their image, masks that are not
    0/1 (e.g. {0, 255}) or not the image's size."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(image_sizes):
        got = f"{type(targets).__name__}" + (f" of length {len(targets)}" if isinstance(targets, (list, tuple)) else "")
        raise ValueError(f"targets must be a list with one dict per image ({len(image_sizes)}), got {got}")
    for i, (t, (h, w)) in enumerate(zip(targets, image_sizes)):
        if not isinstance(t, dict) or not {"boxes", "labels", "masks"} <= set(t):
            raise ValueError(f"targets[{i}] must be a dict with 'boxes', 'labels' and 'masks', got "
                             f"{sorted(t) if isinstance(t, dict) else type(t).__name__}")
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        for key, val in (("boxes", boxes), ("labels", labels), ("masks", masks)):
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"targets[{i}]['{key}'] must be a torch.Tensor, got {type(val).__name__}")
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be float [N, 4] absolute xyxy, got {boxes.dtype} "
                             f"{tuple(boxes.shape)}")
        n = boxes.shape[0]
        if labels.shape != (n,) or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels'] must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
        if masks.ndim != 3 or masks.shape[0] != n or tuple(masks.shape[1:]) != (h, w):
            raise ValueError(f"targets[{i}]['masks'] must be [{n}, {h}, {w}] (one full-image mask per box, the "
                             f"image's size), got {tuple(masks.shape)}")
        if not n:
            continue
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]['boxes'] contain non-finite values")
        bad = torch.nonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).flatten().tolist()
        if bad:
            raise ValueError(f"targets[{i}]['boxes'][{bad[0]}] = {boxes[bad[0]].tolist()} is empty or inverted: "
                             f"boxes are absolute xyxy with x2 > x1 and y2 > y1 ({len(bad)} such boxes)")
        outside = torch.nonzero((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= w) | (boxes[:, 1] >= h))
        if outside.numel():
            k = int(outside[0])
            raise ValueError(f"targets[{i}]['boxes'][{k}] = {boxes[k].tolist()} lies entirely outside the "
                             f"{w}x{h} (w x h) image")
        hi = float(masks.max())
        if masks.dtype != torch.bool and (hi > 1 or float(masks.min()) < 0):
            raise ValueError(f"targets[{i}]['masks'] must hold 0/1 (or probabilities in [0, 1]), got values up to "
                             f"{hi:g}" + (" (a {0, 255} mask: divide it by 255)" if hi == 255 else ""))
