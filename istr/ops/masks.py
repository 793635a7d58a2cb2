"""Mask crop-and-resize (full-image masks -> M x M grids inside boxes) and paste-back (grids -> full image).

This is the one implementation of cropping and pasting in the library: codecs, the model's targets and
inference, and the benchmarks all call it. Cropping is torchvision's `roi_align` (aligned, i.e. half-pixel
centres); COCO polygons and RLEs are rasterised by pycocotools; pasting is bilinear `grid_sample`
(align_corners=False), as detectron2's paste_masks_in_image does.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

__all__ = ["rasterize", "crop_masks", "crop_polygons", "paste_masks", "paste_masks_batched"]


def rasterize(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> uint8 [H, W] in {0, 1}."""
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        polys = [p for p in segmentation if len(p) >= 6]  # a polygon needs >= 3 points
        if not polys:
            raise ValueError(f"polygon segmentation has no polygon with >= 3 points: {segmentation!r:.80}")
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        size = list(segmentation.get("size", (height, width)))
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE (COCO crowd regions)
            rle = mask_utils.frPyObjects(rle, height, width)
    else:
        raise TypeError(f"expected a polygon list or an RLE dict, got {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(np.uint8)


def _as_mask_tensor(masks: Any, image_size: tuple[int, int] | None) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
        return masks
    if isinstance(masks, np.ndarray):
        return _as_mask_tensor(torch.from_numpy(masks), image_size)
    if isinstance(masks, Sequence):
        if image_size is None:
            raise ValueError("image_size=(H, W) is required to rasterise polygons or RLEs")
        h, w = image_size
        if len(masks) == 0:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack([rasterize(s, h, w) for s in masks]))
    raise TypeError(f"masks must be a tensor [N, H, W] or a list of COCO segmentations, got {type(masks).__name__}")


def _check_boxes(boxes: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != n:
        raise ValueError(f"boxes must be [{n}, 4] absolute xyxy, got shape {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain non-finite values")
    return boxes


def crop_masks(
    masks: Any,
    boxes: torch.Tensor,
    mask_size: int,
    image_size: tuple[int, int] | None = None,
    *,
    sampling_ratio: int = 2,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Crop each full-image mask by its box and resize to a soft M x M grid.

    masks: [N, H, W] tensor (bool/uint8/float), or a list of N COCO segmentations with image_size=(H, W).
    boxes: [N, 4] absolute xyxy (one box per mask). Returns float32 [N, M, M] in [0, 1] on boxes' device.
    Threshold the result at 0.5 for binary targets. Memory is bounded by `chunk_size` full-image masks.
    """
    if isinstance(masks, torch.Tensor) or isinstance(masks, np.ndarray):
        masks = _as_mask_tensor(masks, image_size)
        n = masks.shape[0]
    elif isinstance(masks, Sequence):
        n = len(masks)
    else:
        raise TypeError(f"masks must be a tensor [N, H, W] or a list of COCO segmentations, got {type(masks).__name__}")
    boxes = _check_boxes(boxes, n).float()
    if mask_size < 1:
        raise ValueError(f"mask_size must be >= 1, got {mask_size}")
    out = []
    for start in range(0, n, chunk_size):
        part = masks[start : start + chunk_size]
        part = _as_mask_tensor(part, image_size).to(device=boxes.device, dtype=torch.float32)
        b = boxes[start : start + chunk_size]
        rois = torch.cat([torch.arange(len(b), device=b.device, dtype=b.dtype)[:, None], b], dim=1)
        out.append(roi_align(part[:, None], rois, (mask_size, mask_size), 1.0, sampling_ratio, aligned=True)[:, 0])
    if not out:
        return torch.zeros((0, mask_size, mask_size), device=boxes.device)
    return torch.cat(out).clamp_(0.0, 1.0)


def crop_polygons(segmentations: Sequence[Any], boxes: torch.Tensor, mask_size: int,
                  image_size: tuple[int, int] | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The ISTR authors' target crop (detectron2 PolygonMasks.crop_and_resize): each polygon segmentation shifted
    by its box's corner, scaled by M / max(box side, 0.1) and rasterised straight into the binary M x M grid.
    A segmentation that is not a polygon list (an RLE) is cropped as detectron2 crops bitmasks: roi_align of the
    full mask (masks[i] when given, else the segmentation rasterised at image_size), then >= 0.5.
    Returns float [N, M, M] in {0, 1} on boxes' device.

    istr's default target is crop_masks, a soft RoIAlign crop of the full-resolution mask; at M=28 the two differ
    in 2.9% of pixels after thresholding (the first 400 masks of coco_masks_pool's train json).
    ISTR(target_crop="polygon") and coco_mask_grids(..., crop="polygon") use this one."""
    boxes = _check_boxes(boxes, len(segmentations)).float()
    m = int(mask_size)
    out = torch.zeros((len(segmentations), m, m), dtype=torch.float32)
    rle_rows = []
    for i, (seg, (x0, y0, x1, y1)) in enumerate(zip(segmentations, boxes.tolist())):
        if not (isinstance(seg, list) and seg and all(isinstance(p, (list, tuple, np.ndarray)) for p in seg)):
            rle_rows.append(i)
            continue
        sx, sy = m / max(x1 - x0, 0.1), m / max(y1 - y0, 0.1)
        polys = []
        for poly in seg:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            if len(xy) >= 3:
                polys.append(((xy - (x0, y0)) * (sx, sy)).reshape(-1).tolist())
        if polys:
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, m, m))
            out[i] = torch.from_numpy(mask_utils.decode(rle).astype(np.float32))
    if rle_rows:
        full = masks[rle_rows].cpu() if masks is not None else _as_mask_tensor([segmentations[i] for i in rle_rows],
                                                                               image_size)
        out[rle_rows] = (crop_masks(full, boxes[rle_rows].cpu(), m) >= 0.5).float()
    return out.to(boxes.device)


def _bilinear_weights(p0: int, p1: int, lo: float, hi: float, m: int, device: torch.device) -> torch.Tensor:
    """[p1 - p0, m] weights of bilinear sampling (zero padding, align_corners=False) of an m-cell axis spanning
    [lo, hi] at the pixel centres p0 + 0.5, ..., p1 - 0.5."""
    u = (torch.arange(p0, p1, device=device, dtype=torch.float32) + 0.5 - lo) / (hi - lo) * m - 0.5
    return (1 - (u[:, None] - torch.arange(m, device=device, dtype=torch.float32)[None]).abs()).clamp_(min=0)


def paste_masks(
    grids: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | None = None,
) -> torch.Tensor:
    """Paste soft M x M grids into their boxes on a full image by bilinear sampling.

    grids: [N, M, M] (or [N, 1, M, M]) values in [0, 1]; boxes: [N, 4] absolute xyxy in the target image;
    image_size: (H, W). Returns float [N, H, W] (bool if `threshold` is given: value >= threshold).
    Pixels more than one pixel outside a box are 0 (detectron2's CPU paste does the same; its GPU path lets the
    bilinear fade run half a grid cell past the box). A box with zero width or height pastes nothing. Only
    the pixels around each box are sampled, so cost scales with box area rather than N x H x W.

    Bilinear sampling is separable, so each paste is two small matrix products (rows [h, M] @ grid [M, M] @
    cols [M, w]); this equals F.grid_sample(bilinear, zeros padding, align_corners=False) on the same pixels
    and measured 1.1x faster on CPU (100 masks at 800x1216: 0.27 s vs 0.30 s, 1 thread).
    """
    if torch.jit.is_tracing():  # the loop below would be frozen into the trace: a silently wrong graph
        raise RuntimeError("paste_masks loops over the boxes in Python and cannot be traced by torch.jit.trace or the "
                           "legacy torch.onnx.export(..., dynamo=False); use paste_masks_batched, or export a model "
                           "with istr.export.export(model, path)")
    if grids.ndim == 4 and grids.shape[1] == 1:
        grids = grids[:, 0]
    if grids.ndim != 3 or grids.shape[-1] != grids.shape[-2]:
        raise ValueError(f"grids must be [N, M, M], got shape {tuple(grids.shape)}")
    boxes = _check_boxes(boxes, grids.shape[0]).to(grids.device, torch.float32)
    height, width = int(image_size[0]), int(image_size[1])
    out = grids.new_zeros((grids.shape[0], height, width), dtype=torch.float32)
    m = grids.shape[-1]
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        # pixels whose centres can see the grid (one extra pixel each side for the bilinear fade)
        px0, px1 = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, width)
        py0, py1 = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, height)
        if px1 <= px0 or py1 <= py0:
            continue
        rows = _bilinear_weights(py0, py1, y0, y1, m, grids.device)  # [h, M]
        cols = _bilinear_weights(px0, px1, x0, x1, m, grids.device)  # [w, M]
        out[i, py0:py1, px0:px1] = rows @ grids[i].float() @ cols.T
    return out >= threshold if threshold is not None else out


def _window_weights(lo: torch.Tensor, hi: torch.Tensor, size: int | torch.SymInt, m: int) -> torch.Tensor:
    """[..., size, m] bilinear weights (paste_masks' _bilinear_weights) of every pixel of an axis of `size` pixels
    for cells spanning [lo, hi] (lo, hi [...]), zero outside paste_masks' window [floor(lo) - 1, ceil(hi) + 1) and
    for empty spans."""
    pixels = torch.arange(size, device=lo.device).to(torch.float32)  # [size]
    nonempty = hi - lo > 0
    extent = torch.where(nonempty, hi - lo, torch.ones_like(hi))  # no 0/0: an empty span's weights are zeroed
    u = (pixels + 0.5 - lo[..., None]) / extent[..., None] * m - 0.5  # [..., size]
    cells = torch.arange(m, device=lo.device).to(torch.float32)
    weights = (1 - (u[..., None] - cells).abs()).clamp(min=0)  # [..., size, m]
    window = (pixels >= torch.floor(lo)[..., None] - 1) & (pixels < torch.ceil(hi)[..., None] + 1) & nonempty[..., None]
    return weights * window[..., None].to(weights.dtype)


def paste_masks_batched(grids: torch.Tensor, boxes: torch.Tensor, height: int | torch.SymInt,
                        width: int | torch.SymInt) -> torch.Tensor:
    """paste_masks for a batch, without Python loops or data-dependent shapes (traceable and exportable).

    grids [B, K, M, M] in [0, 1]; boxes [B, K, 4] absolute xyxy; (height, width) of the output (ints, or sizes read
    from a tensor's shape). Returns float [B, K, height, width]: each grid pasted into its box as paste_masks does
    (the same bilinear weights, pixels more than one pixel outside the box 0, an empty box pastes nothing), as two
    matrix products per mask over the whole image (rows [H, M] @ grid [M, M] @ cols [M, W]). No value checks: the
    caller passes finite boxes.
    """
    if grids.dim() != 4 or grids.shape[-1] != grids.shape[-2] or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"grids must be [B, K, M, M] and boxes [B, K, 4], got {tuple(grids.shape)} and "
                         f"{tuple(boxes.shape)}")
    m = grids.shape[-1]
    boxes = boxes.to(torch.float32)
    x0, y0, x1, y1 = boxes.unbind(-1)
    rows = _window_weights(y0, y1, height, m)  # [B, K, H, M]
    cols = _window_weights(x0, x1, width, m)  # [B, K, W, M]
    return rows @ grids.to(torch.float32) @ cols.transpose(-1, -2)
