"""Image transform: validate, resize, normalise, pad and batch the inputs; scale boxes back (what every family
shares; each family maps its own detections to results at the original size: istr/results.py, isda/results.py)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from istr.errors import NonFiniteError

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
                             + (" (0..65535 pixels, 16-bit: divide by 65535, or use istr.data.image_tensor)"
                                if hi > 255 else " (0..255 pixels: divide by 255)" if hi > 2 else ""))
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
