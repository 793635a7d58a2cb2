"""Joint image/box/mask augmentation (the ISTR recipe: h-flip, random resize-and-crop, optional scale jitter).

Built on torchvision.transforms.v2 and tv_tensors: `Compose` wraps the target's "boxes" as BoundingBoxes and
"masks" as Mask once, runs the transforms (v2 transforms or any callable (image, target) -> (image, target)),
then unwraps to plain tensors, clips boxes and drops instances whose mask or box became empty.
The model does the final resize (min_size/max_size), so these transforms are augmentation only and optional.
All randomness comes from torch's global RNG (torch.manual_seed makes a sample's augmentation reproducible).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from istr.checks import check_bool, check_number

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "RandomRelativeCrop",
    "build_transforms",
    "boxes_from_masks",
    "PAPER_TRAIN_MIN_SIZES",
    "PAPER_MAX_SIZE",
    "PAPER_CROP_MIN_SIZES",
    "PAPER_CROP_FRACTION",
]

# reference section 6 (v1 / paper): multi-scale short side, crop chain sizes, relative crop fraction
PAPER_TRAIN_MIN_SIZES: tuple[int, ...] = tuple(range(480, 801, 32))
PAPER_MAX_SIZE = 1333
PAPER_CROP_MIN_SIZES: tuple[int, ...] = (400, 500, 600)
PAPER_CROP_FRACTION = 0.7

Target = dict[str, Any]


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of masks [N, H, W] -> float [N, 4] xyxy in continuous pixel coordinates (x1 = last column + 1,
    as pycocotools toBbox). Empty masks give [0, 0, 0, 0]."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    nonempty = masks.flatten(1).any(dim=1).bool()
    if nonempty.any():
        boxes[nonempty] = masks_to_boxes(masks[nonempty].bool()).float() + torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


class RandomHorizontalFlip:
    """torchvision's v2.RandomHorizontalFlip (the same random draw, the same image, boxes and masks) that also
    mirrors target["segmentations"] polygons (x -> W - x: COCO coordinates are continuous, pixel i spans
    [i, i + 1)). Works on tv_tensors inside `Compose`."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = check_number("p", p, min=0.0, max=1.0)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(1) >= self.p:  # v2's one draw: torchvision flips when torch.rand(1) < p
            return image, target
        w = image.shape[-1]
        target = {k: TF.horizontal_flip(v) if isinstance(v, (tv_tensors.BoundingBoxes, tv_tensors.Mask)) else v
                  for k, v in target.items()}
        if "segmentations" in target:
            target["segmentations"] = [_flip_polygons(seg, w) for seg in target["segmentations"]]
        return TF.horizontal_flip(image), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def _flip_polygons(segmentation: Any, width: int) -> Any:
    """A COCO polygon list mirrored horizontally; anything else (an RLE: its mask is flipped) as it is."""
    if not isinstance(segmentation, list):
        return segmentation
    flipped = []
    for poly in segmentation:
        xy = [float(v) for v in poly]
        xy[0::2] = [width - x for x in xy[0::2]]
        flipped.append(xy)
    return flipped


class RandomRelativeCrop:
    """Crop a random window of (round(fraction*H), round(fraction*W)) at a uniform position (detectron2's
    RandomCrop "relative"). Boxes are recomputed from the cropped masks (detectron2's recompute_boxes when
    cropping), so a non-convex object cut by the crop gets its true visible box; emptied instances are dropped.
    Works on tv_tensors inside `Compose`."""

    def __init__(self, fraction: float = PAPER_CROP_FRACTION) -> None:
        self.fraction = check_number("crop fraction", fraction, min=0.0, max=1.0, min_inclusive=False)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = image.shape[-2:]
        ch, cw = max(1, int(h * self.fraction + 0.5)), max(1, int(w * self.fraction + 0.5))
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        image = TF.crop(image, top, left, ch, cw)
        target = dict(target)
        masks = TF.crop(target["masks"], top, left, ch, cw)
        keep = masks.flatten(1).any(dim=1).bool()
        target["masks"] = tv_tensors.wrap(masks[keep], like=masks)
        target["boxes"] = tv_tensors.BoundingBoxes(boxes_from_masks(masks[keep]), format="XYXY", canvas_size=(ch, cw))
        target["labels"] = target["labels"][keep]
        return image, target

    def __repr__(self) -> str:
        return f"RandomRelativeCrop(fraction={self.fraction})"


class Compose:
    """Run joint transforms on (image float [3, H, W], target) and keep boxes, masks and labels consistent.

    Each transform is called as t(image, target) -> (image, target) with image a tv_tensors.Image and the
    target's "boxes"/"masks" as tv_tensors BoundingBoxes/Mask (so torchvision.transforms.v2 transforms apply
    to all of them). Afterwards boxes are clipped to the image, instances with an empty mask or box are dropped
    and target["size"] is set to the new (h, w). An empty list is the identity.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            got = f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
            raise TypeError(f"image must be a tensor [C, H, W], got {got}")
        if "segmentations" in target:
            other = [t for t in self.transforms if not isinstance(t, RandomHorizontalFlip)]
            if other:
                raise ValueError(f"targets with 'segmentations' (polygon target crops) support horizontal flips only "
                                 f"(istr.data.transforms.RandomHorizontalFlip), not {other}: use crop_prob=0")
        h, w = image.shape[-2:]
        target = dict(target)
        image = tv_tensors.Image(image)
        target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
        target["masks"] = tv_tensors.Mask(target["masks"])
        for t in self.transforms:
            image, target = t(image, target)
        return _sanitize(image.as_subclass(torch.Tensor), target)

    def __repr__(self) -> str:
        lines = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {lines}\n])" if self.transforms else "Compose([])"


def _sanitize(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    h, w = image.shape[-2:]
    boxes = target["boxes"].as_subclass(torch.Tensor).float()
    masks = target["masks"].as_subclass(torch.Tensor)
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                         boxes[:, 3].clamp(0, h)], dim=1) if len(boxes) else boxes.reshape(0, 4)  # fmt: skip
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & masks.flatten(1).any(dim=1).bool()
    target = dict(target)
    target.update(boxes=boxes[keep], masks=masks[keep], labels=target["labels"][keep], size=(int(h), int(w)))
    if "segmentations" in target:
        target["segmentations"] = [seg for seg, k in zip(target["segmentations"], keep.tolist()) if k]
    return image, target


def _scaled(sizes: Sequence[int], scale: float) -> list[int]:
    return sorted({max(1, round(s * scale)) for s in sizes})


def build_transforms(
    train: bool,
    *,
    scale: float = 1.0,
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
    crop_min_sizes: Sequence[int] = PAPER_CROP_MIN_SIZES,
    crop_fraction: float = PAPER_CROP_FRACTION,
    max_size: int = PAPER_MAX_SIZE,
    scale_jitter: bool | Sequence[int] = False,
) -> Compose:
    """The paper's augmentation: h-flip (p=flip_prob) -> with p=crop_prob [resize short side to one of
    crop_min_sizes (long side <= max_size) -> relative crop crop_fraction] -> optional scale jitter.

    scale multiplies every size (e.g. 0.25 for CPU work: crop short sides {100, 125, 150}, max 333).
    scale_jitter: False (default; the model resizes), True (paper short sides 480..800 step 32) or a list of
    short sides; long side <= max_size. train=False returns the identity Compose([]).
    """
    check_bool("train", train)
    if not train:
        return Compose([])
    scale = check_number("scale", scale, min=0.0, min_inclusive=False)
    flip_prob = check_number("flip_prob", flip_prob, min=0.0, max=1.0)
    crop_prob = check_number("crop_prob", crop_prob, min=0.0, max=1.0)
    crop_fraction = check_number("crop_fraction", crop_fraction, min=0.0, max=1.0, min_inclusive=False)
    max_size = check_number("max_size", max_size, integer=True, min=1)
    crop_min_sizes = [check_number("crop_min_sizes[]", v, integer=True, min=1) for v in crop_min_sizes]
    if not crop_min_sizes and crop_prob > 0:
        raise ValueError("crop_min_sizes is empty: give at least one short side, or crop_prob=0")
    if not isinstance(scale_jitter, bool):
        if isinstance(scale_jitter, (str, bytes)) or not hasattr(scale_jitter, "__iter__"):
            raise TypeError(f"scale_jitter must be a bool or a list of short sides, got {scale_jitter!r} "
                            f"({type(scale_jitter).__name__})")
        scale_jitter = [check_number("scale_jitter[]", v, integer=True, min=1) for v in scale_jitter]
    top = max(1, round(max_size * scale))
    steps: list[Callable] = []
    if flip_prob > 0:
        steps.append(RandomHorizontalFlip(p=flip_prob))
    if crop_prob > 0:
        crop = [v2.RandomShortestSize(_scaled(crop_min_sizes, scale), max_size=top), RandomRelativeCrop(crop_fraction)]
        steps.append(v2.RandomApply(crop, p=crop_prob))
    if scale_jitter:
        sizes = PAPER_TRAIN_MIN_SIZES if scale_jitter is True else scale_jitter
        steps.append(v2.RandomShortestSize(_scaled(sizes, scale), max_size=top))
    return Compose(steps)
