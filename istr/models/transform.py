"""Image transform, both ways: validate, resize, normalise, pad and batch the inputs; map predictions back to the
original images (box scaling and clipping, mask paste-back or resize)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import masks_to_boxes

from istr.errors import NonFiniteError
from istr.ops.masks import paste_masks

__all__ = ["ImageTransform", "IMAGENET_MEAN", "IMAGENET_STD", "check_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)  # = (58.395, 57.12, 57.375) / 255


def check_images(images: Any) -> list[torch.Tensor]:
    """Validate a list of float [3, H, W] tensors (values in [0, 1]); returns it as a list."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a list of float [3, H, W] tensors (or a [B, 3, H, W] tensor), "
                             f"got a tensor of shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise TypeError(f"images must be a non-empty list of float [3, H, W] tensors, got {type(images).__name__}"
                        + (" of length 0" if isinstance(images, (list, tuple)) else ""))
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"images[{i}] must be a torch.Tensor [3, H, W], got {type(img).__name__}")
        if not img.is_floating_point():
            raise TypeError(f"images[{i}] must be a float tensor with values in [0, 1], got dtype {img.dtype} "
                            "(convert uint8 images with img.float() / 255)")
        if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"images[{i}] must have shape [3, H, W], got {tuple(img.shape)}")
    # one reduction per image, before anything (BatchNorm statistics included) sees the batch
    lo_hi = torch.stack([torch.stack([img.amin(), img.amax()]) for img in images]).float().cpu()
    for i, (lo, hi) in enumerate(lo_hi.tolist()):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError(f"images[{i}] contains NaN or inf values")
        if hi > 1.0 + 1e-3 or lo < -1e-3:
            raise ValueError(f"images[{i}] must hold values in [0, 1], got [{lo:g}, {hi:g}]"
                             + (" (0..255 pixels: divide by 255)" if hi > 2 else ""))
    return list(images)


class ImageTransform(nn.Module):
    """GeneralizedRCNNTransform-like preprocessing (torchvision/detectron2 conventions).

    Resize so the short side is `min_size` (in train mode: one of `train_min_sizes`, drawn per image with the
    torch RNG) unless that makes the long side exceed `max_size`; bilinear, no antialias (as torchvision).
    Then normalise with `mean`/`std` (on [0, 1] pixels), and zero-pad the batch to a multiple of
    `size_divisible` at the bottom/right.
    """

    def __init__(self, min_size: int = 800, max_size: int = 1333, train_min_sizes: Sequence[int] | None = None,
                 size_divisible: int = 32, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.min_size, self.max_size, self.size_divisible = int(min_size), int(max_size), int(size_divisible)
        self.train_min_sizes = tuple(int(s) for s in (train_min_sizes or (min_size,)))
        if min(self.train_min_sizes + (self.min_size, self.max_size, self.size_divisible)) < 1:
            raise ValueError("min_size, max_size, train_min_sizes and size_divisible must be positive")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def config(self) -> dict[str, Any]:
        return {"min_size": self.min_size, "max_size": self.max_size, "train_min_sizes": list(self.train_min_sizes),
                "size_divisible": self.size_divisible}

    def resized_size(self, height: int, width: int, short_side: int) -> tuple[int, int]:
        """(h, w) after resizing an image of (height, width) to `short_side` (capped by max_size)."""
        scale = min(short_side / min(height, width), self.max_size / max(height, width))
        return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: list of float [3, H_i, W_i] in [0, 1] -> (batch [B, 3, Hp, Wp], resized sizes [(h_i, w_i)])."""
        resized, sizes = [], []
        for img in images:
            img = img.to(dtype=self.mean.dtype)
            h, w = img.shape[-2:]
            if self.training and len(self.train_min_sizes) > 1:
                short = self.train_min_sizes[int(torch.randint(len(self.train_min_sizes), ()))]
            else:
                short = self.train_min_sizes[0] if self.training else self.min_size
            size = self.resized_size(h, w, short)
            if size != (h, w):
                img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            # normalising after resizing is exact (a per-channel affine map commutes with bilinear interpolation)
            resized.append((img - self.mean) / self.std)
            sizes.append(size)
        div = self.size_divisible
        hp = int(math.ceil(max(s[0] for s in sizes) / div) * div)
        wp = int(math.ceil(max(s[1] for s in sizes) / div) * div)
        batch = resized[0].new_zeros((len(resized), 3, hp, wp))
        for b, img in enumerate(resized):
            batch[b, :, : img.shape[1], : img.shape[2]] = img
        return batch, sizes

    def same_size_groups(self, images: list[torch.Tensor]) -> list[list[int]]:
        """Image indices grouped by the padded size each image gets on its own (eval-mode resize, rounded up to
        size_divisible). A batch of one group is padded exactly as each of its images alone, so models that run
        inference group by group give every image the result it gets alone, whatever else is in the batch."""
        groups: dict[tuple[int, int], list[int]] = {}
        div = self.size_divisible
        for i, img in enumerate(images):
            h, w = self.resized_size(int(img.shape[-2]), int(img.shape[-1]), self.min_size)
            groups.setdefault((-(-h // div) * div, -(-w // div) * div), []).append(i)
        return list(groups.values())

    @staticmethod
    def scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
        """Rescale [N, 4] absolute xyxy boxes from an image of size (h, w) `from_size` to `to_size`."""
        sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    def postprocess(self, detections: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]], mask_threshold: float | None = None,
                    mask_stride: int = 4) -> list[dict]:
        """Per-image detections on the resized input -> results at each original image size.

        detections[i]: {"labels" [N], "scores" [N]} and one of
        - "boxes" [N, 4] xyxy on the resized input + "mask_grids" [N, M, M] in [0, 1] relative to each box (ISTR):
          boxes are rescaled and clipped to the image, those empty after clipping dropped (detectron2), and the
          grids pasted into the clipped boxes;
        - "mask_maps" [N, h, w] in [0, 1] covering the padded batch at stride `mask_stride` (ISDA): upsampled
          (bilinear), cropped to the resized image, resized to the original size; boxes are the tight boxes of
          the masks binarised at mask_threshold (0.5 when None); masks empty at the original size are dropped.
        Returns [{"boxes" [N, 4], "labels" [N], "scores" [N], "masks" [N, 1, H, W]}]; masks are binary (float 0/1)
        when mask_threshold is given, else probabilities.
        """
        results = []
        for det, size, (h, w) in zip(detections, sizes, original_sizes):
            labels, scores = det["labels"], det["scores"]
            if "mask_grids" in det:
                boxes = self.scale_boxes(det["boxes"], size, (h, w))
                boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                     boxes[:, 3].clamp(0, h)], 1)
                keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
                masks = paste_masks(det["mask_grids"][keep], boxes, (h, w))
            else:
                maps = det["mask_maps"]
                masks = maps.new_zeros((maps.shape[0], h, w))
                if maps.shape[0]:
                    up = F.interpolate(maps[:, None].float(), scale_factor=mask_stride, mode="bilinear",
                                       align_corners=False)
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


def grouped(infer, images: list[torch.Tensor], groups: list[list[int]], all_stages: bool) -> Any:
    """Run `infer(images of one group, all_stages)` per group and put the results back in input order
    (a list of per-image results, or with all_stages a list over stages of such lists)."""
    if len(groups) == 1:
        return infer(images, all_stages)
    parts = [(group, infer([images[i] for i in group], all_stages)) for group in groups]
    num_stages = len(parts[0][1]) if all_stages else 1
    merged: list[list[Any]] = [[None] * len(images) for _ in range(num_stages)]
    for group, out in parts:
        for stage, results in enumerate(out if all_stages else [out]):
            for i, result in zip(group, results):
                merged[stage][i] = result
    return merged if all_stages else merged[0]
