"""ISTR's detections-to-results step: boxes scaled back to each original image and clipped, M x M mask grids pasted
into them (detectron2's paste), empty boxes dropped."""
from __future__ import annotations

import torch

from istr.models.transform import ImageTransform
from istr.ops.masks import paste_masks

__all__ = ["paste_results"]


def paste_results(detections: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                  original_sizes: list[tuple[int, int]], mask_threshold: float | None = None) -> list[dict]:
    """Per-image detections on the resized input -> results at each original image size.

    detections[i]: {"boxes" [N, 4] xyxy on the resized input, "labels" [N], "scores" [N], "mask_grids" [N, M, M]
    in [0, 1] relative to each box}. Boxes are rescaled and clipped to the image, those empty after clipping dropped
    (detectron2), and the grids pasted into the clipped boxes.
    Returns [{"boxes" [N, 4], "labels" [N], "scores" [N], "masks" [N, 1, H, W]}]; masks are binary (float 0/1)
    when mask_threshold is given, else probabilities.
    """
    results = []
    for det, size, (h, w) in zip(detections, sizes, original_sizes):
        boxes = ImageTransform.scale_boxes(det["boxes"], size, (h, w))
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                             boxes[:, 3].clamp(0, h)], 1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels, scores = boxes[keep], det["labels"][keep], det["scores"][keep]
        masks = paste_masks(det["mask_grids"][keep], boxes, (h, w))
        if mask_threshold is not None:
            masks = (masks >= mask_threshold).float()
        results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks[:, None]})
    return results
