"""ISDA's training targets: GT masks resampled to the grid of the mask logits (the padded batch at the mask stride)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["mask_targets"]


def mask_targets(targets: Sequence[dict], sizes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
                 stride: int, device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """ISDA's targets: each GT mask resized (bilinear) with its image to the resized size, zero-padded to the
    padded batch size and downsampled bilinearly by `stride` (soft values), the grid of the mask logits.

    Returns per image {"labels" [T], "masks" [T, Hp/stride, Wp/stride] in [0, 1], "image_size" [2] (h, w)}.
    """
    hp, wp = padded_size
    prepared = []
    for t, (h, w) in zip(targets, sizes):
        masks = t["masks"].to(device=device, dtype=torch.float32)
        canvas = masks.new_zeros((masks.shape[0], 1, hp, wp))
        if len(masks):
            canvas[:, :, :h, :w] = F.interpolate(masks[:, None], size=(h, w), mode="bilinear", align_corners=False)
        low = F.interpolate(canvas, scale_factor=1.0 / stride, mode="bilinear", align_corners=False)[:, 0]
        prepared.append({"labels": t["labels"].to(device), "masks": low.clamp_(0, 1),
                         "image_size": torch.tensor((h, w), dtype=torch.float32, device=device)})
    return prepared
