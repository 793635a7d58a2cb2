"""ISDA's detections-to-results step: mask maps at the mask stride upsampled to each original image, boxes the tight
boxes of the binarised masks, empty masks dropped."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from istr.models.isda.heads import tight_boxes

__all__ = ["map_results", "masks_to_results"]

# Mask pixels per chunk of masks_to_results: each chunk is upsampled, binarised and reduced to its rows and columns
# while it is in the CPU's caches (16 MB: four 800x1216 masks)
_CHUNK_PIXELS = 2 ** 22


def map_results(detections: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], mask_threshold: float | None, mask_stride: int) -> list[dict]:
    """Per-image detections -> results at each original image size.

    detections[i]: {"labels" [N], "scores" [N], "mask_maps" [N, h, w] in [0, 1] covering the padded batch at stride
    `mask_stride`}: upsampled (bilinear), cropped to the resized image, resized to the original size; boxes are the
    tight boxes of the masks binarised at mask_threshold (0.5 when None); masks empty at the original size dropped.
    Returns [{"boxes" [N, 4], "labels" [N], "scores" [N], "masks" [N, 1, H, W]}]; masks are binary (float 0/1)
    when mask_threshold is given, else probabilities.
    """
    return [masks_to_results(det["mask_maps"], original, det["labels"], det["scores"], mask_threshold,
                             stride=mask_stride, crop=size)
            for det, size, original in zip(detections, sizes, original_sizes)]


def _bilinear(x: torch.Tensor, size: tuple[int, int], scale: float | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """F.interpolate(x [N, 1, h, w], scale_factor=scale, bilinear, align_corners=False), or, given out [N, 1, *size],
    the same op written into it (scale given, the kernel uses 1 / scale as F.interpolate(scale_factor=scale) does;
    None: the ratio of the sizes, as F.interpolate(size=size))."""
    if out is None:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return torch.ops.aten.upsample_bilinear2d.out(x, list(size), False, scale, scale, out=out)


def masks_to_results(masks: torch.Tensor | None, original_size: tuple[int, int], labels: torch.Tensor,
                     scores: torch.Tensor, mask_threshold: float | None, like: torch.Tensor | None = None,
                     stride: int = 1, crop: tuple[int, int] | None = None) -> dict:
    """One image's soft masks [N, h, w] -> {"boxes", "labels", "scores", "masks" [N, 1, H, W]} at original_size
    (H, W): upsampled by `stride` (bilinear; 1: the masks are at the resized image's size already), cropped to
    `crop` (the resized image's size; None: no crop), resized bilinearly to (H, W), binarised at mask_threshold
    (0.5 for the boxes when None; the masks stay probabilities then), masks empty at the original size dropped,
    boxes their tight boxes ending after the last pixel. masks None or N = 0: no detection (then `like` gives the
    dtype and device). With stride 1, no crop, masks already float32 [N, H, W] and contiguous, they are binarised in
    place (the caller's tensor is overwritten).

    Written for images of a megapixel and 100 detections (a few hundred MB of masks): the masks go through these
    steps a chunk at a time (_CHUNK_PIXELS), each written straight into the output and binarised and reduced while
    it is in the CPU's caches; a resize to the size the masks already have (the usual case at inference: the network
    ran at the image's own size) is skipped, as it returns its input unchanged; the boxes come from the maxima of each
    row and column instead of torchvision's masks_to_boxes, which loops over the masks with a nonzero() each (100 masks
    at 800x1216 on one CPU thread: 1.7 s -> 0.4 s for these two, 0.34 -> 0.28 s for the chunks). The values are those
    of the plain upsample -> crop -> resize -> threshold -> masks_to_boxes chain, bit for bit
    (tests/models/test_shared_parts.py). The masks carry no gradient (they are written into preallocated outputs
    and thresholded), so eval mode runs with autograd enabled too."""
    h, w = original_size
    masks = masks.detach() if masks is not None else None
    if masks is None or not masks.shape[0]:
        ref = masks if masks is not None else like
        empty = ref.new_zeros((0, h, w), dtype=torch.float32 if stride != 1 else ref.dtype)
        return {"boxes": empty.new_zeros((0, 4)), "labels": labels[:0], "scores": scores[:0], "masks": empty[:, None]}
    n, device = masks.shape[0], masks.device
    up_size = (masks.shape[-2] * stride, masks.shape[-1] * stride)
    cropped = up_size if crop is None else (min(crop[0], up_size[0]), min(crop[1], up_size[1]))
    in_place = stride == 1 and cropped == up_size == (h, w) and masks.dtype == torch.float32 and masks.is_contiguous()
    out = masks if in_place else torch.empty(n, h, w, dtype=torch.float32 if stride != 1 else masks.dtype, device=device)
    rows = torch.empty(n, h, dtype=torch.bool, device=device)
    cols = torch.empty(n, w, dtype=torch.bool, device=device)
    step = max(1, _CHUNK_PIXELS // (h * w))
    for i0 in range(0, n, step):
        i1 = min(i0 + step, n)
        dest = out[i0:i1]
        if not in_place:
            x = masks[i0:i1, None]
            if stride != 1 and cropped == up_size == (h, w):  # the upsample is the last step: into the output
                _bilinear(x.float(), up_size, float(stride), out=dest[:, None])
            else:
                if stride != 1:
                    x = _bilinear(x.float(), up_size, float(stride))
                x = x[:, :, :cropped[0], :cropped[1]]
                if x.shape[-2:] == (h, w):
                    dest.copy_(x[:, 0])
                else:
                    _bilinear(x, (h, w), None, out=dest[:, None])
        on = dest.ge_(mask_threshold) if mask_threshold is not None else dest >= 0.5  # float 0/1 in place, or bool
        # amax > 0 on the float 0/1 masks: 4-7x faster than any() on CPU, the same answer
        if on.is_floating_point():
            torch.gt(on.amax(-1), 0, out=rows[i0:i1])
            torch.gt(on.amax(-2), 0, out=cols[i0:i1])
        else:
            torch.any(on, -1, out=rows[i0:i1])
            torch.any(on, -2, out=cols[i0:i1])
    keep = rows.any(-1)
    if not bool(keep.all()):
        out, rows, cols, labels, scores = out[keep], rows[keep], cols[keep], labels[keep], scores[keep]
    boxes = tight_boxes(rows, cols).to(out.dtype)
    return {"boxes": boxes, "labels": labels, "scores": scores, "masks": out[:, None]}
