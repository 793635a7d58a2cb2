"""ISDA's detections-to-results step: mask maps at the mask stride upsampled to each original image, boxes the tight
boxes of the binarised masks, empty masks dropped."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import masks_to_boxes

__all__ = ["map_results"]


def map_results(detections: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], mask_threshold: float | None, mask_stride: int) -> list[dict]:
    """Per-image detections -> results at each original image size.

    detections[i]: {"labels" [N], "scores" [N], "mask_maps" [N, h, w] in [0, 1] covering the padded batch at stride
    `mask_stride`}: upsampled (bilinear), cropped to the resized image, resized to the original size; boxes are the
    tight boxes of the masks binarised at mask_threshold (0.5 when None); masks empty at the original size dropped.
    Returns [{"boxes" [N, 4], "labels" [N], "scores" [N], "masks" [N, 1, H, W]}]; masks are binary (float 0/1)
    when mask_threshold is given, else probabilities.
    """
    results = []
    for det, size, (h, w) in zip(detections, sizes, original_sizes):
        labels, scores, maps = det["labels"], det["scores"], det["mask_maps"]
        masks = maps.new_zeros((maps.shape[0], h, w))
        if maps.shape[0]:
            up = F.interpolate(maps[:, None].float(), scale_factor=mask_stride, mode="bilinear", align_corners=False)
            up = up[:, :, : size[0], : size[1]]
            masks = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        binary = masks >= (0.5 if mask_threshold is None else mask_threshold)
        keep = binary.flatten(1).any(1)
        masks, binary, labels, scores = masks[keep], binary[keep], labels[keep], scores[keep]
        boxes = masks_to_boxes(binary).to(masks.dtype) if len(masks) else masks.new_zeros((0, 4))
        boxes[:, 2:] += 1  # masks_to_boxes gives the last pixel's index; boxes end after it
        if mask_threshold is not None:
            masks = (masks >= mask_threshold).float()
        results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks[:, None]})
    return results
