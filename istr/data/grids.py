"""COCO masks as codec training data: the GT masks of a COCO-format annotation file cropped by their boxes to the
M x M grids a model's mask targets use (ISTR's targets, codec fitting, codec benchmarks)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from istr.checks import check_choice, check_number
from istr.ops.masks import crop_masks, crop_polygons, rasterize

__all__ = ["coco_mask_grids"]

logger = logging.getLogger(__name__)


def coco_mask_grids(ann_file: str | Path, mask_size: int, max_masks: int | None = None,
                    include_crowd: bool = False, min_box_size: float = 1.0, seed: int = 0,
                    return_stats: bool = False, crop: str = "roi_align") -> torch.Tensor | tuple[torch.Tensor, dict[str, int]]:
    """GT masks of a COCO json cropped by their GT boxes to float grids [N, M, M] in [0, 1].

    crop "roi_align" (default): soft RoIAlign crops of the full-resolution masks, what ISTR's targets use by
    default; "polygon": the authors' binary crops, polygons rasterised straight into the grid (istr.ops.crop_polygons),
    to fit a codec the way the reference did.

    Needs no images: polygons/RLEs are rasterised at the json's image size and cropped with
    istr.ops.crop_masks (RoIAlign, aligned=True), the same crop the model applies to training targets.
    Annotations are read by istr.data.read_coco_annotations, the same policy as CocoInstances (same drops, same
    counts; clipped boxes; a box taken from the mask when the json has none); masks that rasterise empty are
    dropped too ("dropped_empty_masks"), and masks with no pixel inside their box ("dropped_box_misses_mask": their
    crop would be an empty grid). max_masks: keep a random subset of this many usable annotations (seeded,
    chosen before empty masks are dropped), None keeps all. return_stats=True returns (grids, stats) with the
    reader's counts plus "dropped_empty_masks" and "masks" (the number of grids returned).
    """
    from istr.data.coco import describe_stats, load_coco_json, mask_inside_box, read_coco_annotations

    mask_size = check_number("mask_size", mask_size, integer=True, min=1)
    check_choice("crop", crop, ("roi_align", "polygon"))
    max_masks = check_number("max_masks", max_masks, integer=True, min=1, allow_none=True)
    seed = check_number("seed", seed, integer=True, min=0)
    coco = load_coco_json(ann_file)
    images, stats = read_coco_annotations(coco, min_box_size=min_box_size, include_crowd=include_crowd)
    position = {a["id"]: i for i, a in enumerate(coco.dataset["annotations"])}
    entries = sorted(((img, a) for img in images for a in img["anns"]), key=lambda e: position[e[1]["id"]])
    if max_masks is not None and len(entries) > max_masks:
        keep = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed))[:max_masks]
        entries = [entries[i] for i in sorted(keep.tolist())]
    by_image: dict[int, tuple[dict, list[dict[str, Any]]]] = {}
    for img, a in entries:
        by_image.setdefault(img["id"], (img, []))[1].append(a)
    grids, empty, misses = [], 0, 0
    for img, anns in by_image.values():
        for start in range(0, len(anns), 64):  # bounded memory: 64 full-image masks at a time
            masks, boxes, segs = [], [], []
            for a in anns[start : start + 64]:
                mask = _rasterize(a, img, ann_file)
                if not mask.any():
                    empty += 1
                elif not mask_inside_box(mask, a["box"]):
                    misses += 1
                else:
                    masks.append(mask)
                    boxes.append(a["box"])
                    segs.append(a["segmentation"])
            if masks:
                full, box = torch.from_numpy(np.stack(masks)), torch.tensor(boxes)
                grids.append(crop_polygons(segs, box, mask_size, masks=full) if crop == "polygon"
                             else crop_masks(full, box, mask_size))
    stats["dropped_empty_masks"] = empty
    stats["dropped_box_misses_mask"] = misses
    stats["masks"] = sum(len(g) for g in grids)
    if not grids:
        raise ValueError(f"{ann_file} has no usable annotations with segmentations to fit a codec on "
                         f"({describe_stats(stats)})")
    if stats["dropped_degenerate_boxes"] or stats["dropped_invalid_segmentations"] or empty or misses:
        logger.warning("%s: %s", ann_file, describe_stats(stats))
    out = torch.cat(grids).clamp_(0, 1)
    return (out, stats) if return_stats else out


def _rasterize(ann: dict, img: dict, ann_file: str | Path) -> np.ndarray:
    try:
        return rasterize(ann["segmentation"], img["height"], img["width"])
    except (ValueError, TypeError) as exc:
        where = f"annotation {ann['id']} of image {img['id']} ({img['file_name']})"
        raise ValueError(f"{ann_file}: {where}: {exc}") from exc
