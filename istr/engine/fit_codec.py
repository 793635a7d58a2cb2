"""Fit a mask codec on the GT masks of a COCO-format annotation file (box-cropped M x M grids, as the model sees)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


from istr.codecs import MaskCodec, create_codec
from istr.data.grids import coco_mask_grids

__all__ = ["coco_mask_grids", "fit_codec_on_coco"]

logger = logging.getLogger(__name__)


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
