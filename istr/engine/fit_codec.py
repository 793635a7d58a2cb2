"""Fit a mask codec on the GT masks of a COCO-format annotation file (box-cropped M x M grids, as the model sees)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from istr.codecs import MaskCodec, create_codec
from istr.ops.masks import crop_masks

__all__ = ["coco_mask_grids", "fit_codec_on_coco"]


def coco_mask_grids(ann_file: str | Path, mask_size: int, max_masks: int | None = None,
                    include_crowd: bool = False, min_box_size: float = 1.0, seed: int = 0) -> torch.Tensor:
    """GT masks of a COCO json cropped by their GT boxes to float grids [N, M, M] in [0, 1].

    Needs no images: polygons/RLEs are rasterised at the json's image size and cropped with
    istr.ops.crop_masks (RoIAlign, aligned=True), the same crop the model applies to training targets.
    max_masks: keep a random subset of this many annotations (seeded), None keeps all.
    """
    from istr.data.coco import load_coco_json

    if not isinstance(mask_size, int) or mask_size < 1:
        raise ValueError(f"mask_size must be a positive int, got {mask_size!r}")
    coco = load_coco_json(ann_file)
    anns = [a for a in coco.dataset.get("annotations", [])
            if (include_crowd or not a.get("iscrowd", 0)) and a.get("segmentation")
            and min(a["bbox"][2], a["bbox"][3]) >= min_box_size]
    if max_masks is not None and len(anns) > max_masks:
        keep = torch.randperm(len(anns), generator=torch.Generator().manual_seed(seed))[:max_masks]
        anns = [anns[i] for i in sorted(keep.tolist())]
    if not anns:
        raise ValueError(f"{ann_file} has no usable annotations with segmentations to fit a codec on")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    grids = []
    for image_id, image_anns in by_image.items():
        info = coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in image_anns)],
                             dtype=torch.float32)
        grids.append(crop_masks([a["segmentation"] for a in image_anns], boxes, mask_size, image_size=(h, w)))
    return torch.cat(grids).clamp_(0, 1)


def fit_codec_on_coco(codec: MaskCodec | str, ann_file: str | Path, max_masks: int | None = None,
                      seed: int = 0, **codec_kwargs: Any) -> MaskCodec:
    """Fit `codec` (a MaskCodec, or a registered name built with codec_kwargs) on the masks of `ann_file`."""
    if isinstance(codec, str):
        codec = create_codec(codec, **codec_kwargs)
    elif codec_kwargs:
        raise ValueError(f"codec_kwargs {sorted(codec_kwargs)} only apply when codec is given by name")
    if not isinstance(codec, MaskCodec):
        raise TypeError(f"codec must be a MaskCodec or a codec name, got {type(codec).__name__}")
    grids = coco_mask_grids(ann_file, codec.mask_size, max_masks=max_masks, seed=seed)
    return codec.fit(grids)
