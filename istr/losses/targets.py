"""Training targets: validate torchvision-style targets once, then prepare what the loss terms read.

Both model families take the same targets (the torchvision detection format): per image {"boxes": float [N, 4]
absolute xyxy in original pixels, "labels": int64 [N] in [0, C), "masks": uint8/bool [N, H, W] 0/1 (or float in
[0, 1]) full-image masks}. `check_targets` rejects what would train silently wrong; `box_targets` (ISTR) and
`mask_targets` (ISDA) turn them into the per-image dicts the cost and loss terms read (istr.matching.costs).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from istr.ops.masks import crop_masks, crop_polygons

__all__ = ["check_call", "check_targets", "box_targets", "mask_targets"]


def _scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def check_call(model: Any, images: Any, targets: Any, all_stages: bool,
               device: torch.device) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """The checks of a detection model's forward(images, targets, all_stages), shared by the families: valid
    images on `device`; in train mode targets (checked) and a criterion, no all_stages; in eval mode no targets.
    Returns (images as a list, their (h, w) sizes)."""
    from istr.models.transform import check_images

    images = check_images(images)
    if any(img.device != device for img in images):
        raise ValueError(f"images must be on the model's device {device}, got {sorted({str(i.device) for i in images})}")
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    if model.training:
        if all_stages:
            raise ValueError("all_stages=True is an inference option; call model.eval() first")
        if targets is None:
            raise ValueError("training mode needs targets (list of dicts with boxes, labels, masks); "
                             "call model.eval() for inference")
        if model.criterion is None:
            raise ValueError("this model has no criterion; build it with criterion=SetCriterion(...) to train")
        check_targets(targets, sizes, model.num_classes)
    elif targets is not None:
        raise ValueError("targets were given in eval mode, where they would be ignored: call model.train() "
                         "to compute losses, or drop the targets to predict")
    return images, sizes


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


def box_targets(targets: Sequence[dict], original_sizes: Sequence[tuple[int, int]], sizes: Sequence[tuple[int, int]],
                mask_size: int, device: torch.device | str, codec=None, crop: str = "roi_align") -> list[dict]:
    """ISTR's targets: GT masks cropped by their GT boxes at the original resolution to M x M grids, boxes rescaled
    to the resized input, the resized image size, and, with a codec, "mask_embeds" = codec.encode(mask_grids) (one
    encode for the batch).

    crop "roi_align" (istr's default): soft grids, RoIAlign of the full-resolution mask (istr.ops.crop_masks);
    "polygon": the authors' binary crop, each target's "segmentations" polygons rasterised straight into the grid
    (istr.ops.crop_polygons; CocoInstances(segmentations=True) provides them).

    Returns per image {"boxes" [T, 4], "labels" [T], "mask_grids" [T, M, M], "image_size" [2] (h, w)
    (+ "mask_embeds" [T, l])}. ValueError naming the instance when a box holds none of its mask.
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
        prepared.append({"boxes": _scale_boxes(boxes, orig, size), "labels": t["labels"].to(device),
                         "mask_grids": grids, "image_size": torch.tensor(size, dtype=torch.float32, device=device)})
    if codec is not None and prepared:
        with torch.no_grad():
            embeds = codec.encode(torch.cat([p["mask_grids"] for p in prepared]))
        for p, e in zip(prepared, embeds.split([len(p["mask_grids"]) for p in prepared])):
            p["mask_embeds"] = e
    return prepared


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
