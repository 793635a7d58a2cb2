"""ISTR's training targets: GT masks cropped by their GT boxes to the codec's M x M grids, boxes on the resized input."""
from __future__ import annotations

from typing import Sequence

import torch

from istr.models.transform import ImageTransform
from istr.ops.masks import crop_masks, crop_polygons

__all__ = ["box_targets"]


def box_targets(targets: Sequence[dict], original_sizes: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]],
                mask_size: int, device: torch.device | str, crop: str = "roi_align") -> list[dict]:
    """ISTR's targets: GT masks cropped by their GT boxes at the original resolution to M x M grids, boxes rescaled
    to the resized input, and the resized image size. (The criterion adds "mask_embeds" = codec.encode(mask_grids),
    one encode for the batch: istr.matching.costs.with_target_embeds.)

    crop "roi_align" (istr's default): soft grids, RoIAlign of the full-resolution mask (istr.ops.crop_masks);
    "polygon": the authors' binary crop, each target's "segmentations" polygons rasterised straight into the grid
    (istr.ops.crop_polygons; CocoInstances(segmentations=True) provides them).

    Returns per image {"boxes" [T, 4], "labels" [T], "mask_grids" [T, M, M], "image_size" [2] (h, w)}. ValueError naming the instance when a box holds none of its mask.
    """
    prepared = []
    for i, (t, orig, size) in enumerate(zip(targets, original_sizes, sizes)):
        boxes = t["boxes"].to(device=device, dtype=torch.float32)
        if crop == "polygon":
            if "segmentations" not in t:
                raise ValueError(f"targets[{i}] has no 'segmentations': the polygon target crop needs each instance's "
                                 "COCO polygons (istr.data.CocoInstances(..., segmentations=True))")
            grids = crop_polygons(t["segmentations"], boxes, mask_size, masks=t["masks"])
        else:
            grids = crop_masks(t["masks"].to(device), boxes, mask_size)
        empty = torch.nonzero(grids.flatten(1).amax(1) == 0).flatten().tolist() if len(grids) else []
        if empty:
            raise ValueError(f"targets[{i}]: the box {boxes[empty[0]].tolist()} of instance {empty[0]} contains none "
                             f"of its mask ({len(empty)} such instances): boxes and masks must describe the same object")
        prepared.append({"boxes": ImageTransform.scale_boxes(boxes, orig, size), "labels": t["labels"].to(device),
                         "mask_grids": grids, "image_size": torch.tensor(size, dtype=torch.float32, device=device)})
    return prepared


