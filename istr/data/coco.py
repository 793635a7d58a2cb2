"""COCO-format instance segmentation dataset: images + boxes/labels/full-image masks, with clear errors for bad data."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from istr.ops.masks import rasterize

__all__ = ["CocoInstances", "collate_fn", "load_image", "load_coco_json"]

logger = logging.getLogger(__name__)

Target = dict[str, Any]
Transforms = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as RGB float [3, H, W] in [0, 1] (PIL; grayscale/RGBA/palette converted to RGB).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for an empty or undecodable one.
    PIL rather than torchvision.io: torchvision's image decoders are deprecated since 0.29.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as pil:
            array = np.array(pil.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def load_coco_json(ann_file: str | Path) -> COCO:
    """Load and validate a COCO instances json -> pycocotools COCO (silently, no prints).

    Errors name the file and say what is wrong: missing file, invalid JSON (with line/column), missing top-level
    keys, annotations pointing at unknown images or categories, duplicate ids.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise ValueError(f"annotation file {path} is not valid JSON: {e.msg} at {where}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"annotation file {path} is not UTF-8 text: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(
            f"annotation file {path}: expected lists under keys {missing}; top-level keys are {sorted(data)}"
        )
    _check_entries(path, data)
    data.setdefault("info", {})  # some tools (older pycocotools loadRes) need these keys
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_entries(path: Path, data: dict) -> None:
    def need(entries: list, keys: tuple[str, ...], what: str) -> None:
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                raise ValueError(
                    f"annotation file {path}: {what}[{i}] must be an object with keys {keys}, got {entry!r:.200}"
                )

    need(data["images"], ("id", "file_name", "height", "width"), "images")
    need(data["categories"], ("id", "name"), "categories")
    need(data["annotations"], ("id", "image_id", "category_id"), "annotations")
    for what in ("images", "categories", "annotations"):
        counts = Counter(e["id"] for e in data[what])
        if len(counts) != len(data[what]):
            dup = [i for i, n in counts.items() if n > 1][:5]
            raise ValueError(f"annotation file {path}: duplicate {what} ids, e.g. {dup}")
    image_ids = {e["id"] for e in data["images"]}
    cat_ids = {e["id"] for e in data["categories"]}
    bad_img = [a["id"] for a in data["annotations"] if a["image_id"] not in image_ids]
    bad_cat = [a["id"] for a in data["annotations"] if a["category_id"] not in cat_ids]
    if bad_img:
        raise ValueError(f"annotation file {path}: {len(bad_img)} annotations refer to unknown image ids "
                         f"(annotation ids {bad_img[:5]})")
    if bad_cat:
        raise ValueError(f"annotation file {path}: {len(bad_cat)} annotations refer to unknown category ids "
                         f"(annotation ids {bad_cat[:5]})")


def _valid_segmentation(seg: Any) -> bool:
    if isinstance(seg, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in seg)
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


class CocoInstances(Dataset):
    """COCO-format instance segmentation dataset.

    `dataset[i] -> (image, target)`: image float [3, H, W] in [0, 1]; target {"boxes": float [N, 4] absolute xyxy,
    "labels": int64 [N] in [0, C), "masks": uint8 [N, H, W], "image_id": int, "orig_size": (h, w) of the file,
    "size": (h, w) after transforms}. Crowd regions (iscrowd=1) are left out of the targets (COCOeval still uses
    them through `dataset.coco`). COCO category ids map to contiguous labels sorted by id:
    `label_to_category_id[label]`, `category_id_to_label[cat_id]`, `category_names[label]`.

    Boxes come from the json bbox, clipped to the image; an annotation whose clipped box is narrower or shorter
    than `min_box_size` pixels, or whose segmentation is missing/invalid, is dropped (counts in `dataset.stats`,
    plus one logged warning). An instance whose mask rasterises empty is dropped when loaded (counted in
    `stats["dropped_empty_masks"]`, per process). Images without any usable non-crowd annotation are dropped
    unless `include_empty=True` (the paper drops them for training; use include_empty=True for COCO-protocol
    evaluation, which scores false positives on such images too).
    `transforms(image, target) -> (image, target)` (see istr.data.transforms) runs after loading.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Transforms | None = None,
        include_empty: bool = False,
        min_box_size: float = 1.0,
        check_image_size: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        if min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {min_box_size}")
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_empty = include_empty
        self.min_box_size = float(min_box_size)
        self.check_image_size = check_image_size
        self.coco = load_coco_json(self.ann_file)

        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_category_id: list[int] = [int(c["id"]) for c in cats]
        self.category_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_category_id)}
        self.category_names: list[str] = [str(c["name"]) for c in cats]

        self.stats: dict[str, int] = dict.fromkeys(
            ["images_total", "images", "images_without_annotations", "annotations_total", "crowd_annotations",
             "instances", "clipped_boxes", "dropped_degenerate_boxes", "dropped_invalid_segmentations",
             "dropped_empty_masks"], 0)  # fmt: skip
        self._records = self._build_records()
        self.ids: list[int] = [r["id"] for r in self._records]
        self._report()

    # ---------------------------------------------------------------- index building
    def _build_records(self) -> list[dict]:
        s = self.stats
        records = []
        for img in sorted(self.coco.dataset["images"], key=lambda im: im["id"]):
            h, w = int(img["height"]), int(img["width"])
            anns = []
            for ann in self.coco.imgToAnns.get(img["id"], []):
                s["annotations_total"] += 1
                if ann.get("iscrowd", 0):
                    s["crowd_annotations"] += 1
                    continue
                if not _valid_segmentation(ann.get("segmentation")):
                    s["dropped_invalid_segmentations"] += 1
                    continue
                box = self._clipped_box(ann, h, w)
                if box is None:
                    s["dropped_degenerate_boxes"] += 1
                    continue
                anns.append({"id": ann["id"], "box": box, "label": self.category_id_to_label[ann["category_id"]],
                             "segmentation": ann["segmentation"]})  # fmt: skip
            s["images_total"] += 1
            if not anns:
                s["images_without_annotations"] += 1
                if not self.include_empty:
                    continue
            s["instances"] += len(anns)
            records.append({"id": int(img["id"]), "file_name": img["file_name"], "height": h, "width": w, "anns": anns})
        s["images"] = len(records)
        return records

    def _clipped_box(self, ann: dict, h: int, w: int) -> list[float] | None:
        bbox = ann.get("bbox")
        if bbox is None:  # no bbox in the json: take the segmentation's bounds
            from pycocotools import mask as mask_utils

            seg = ann["segmentation"]
            rle = mask_utils.frPyObjects(seg if isinstance(seg, list) else [seg], h, w)
            bbox = mask_utils.toBbox(mask_utils.merge(rle)).tolist()
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            return None
        x0, y0, bw, bh = (float(v) for v in bbox)
        box = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x0 + bw, 0.0), w), min(max(y0 + bh, 0.0), h)]
        if box != [x0, y0, x0 + bw, y0 + bh]:
            self.stats["clipped_boxes"] += 1
        if box[2] - box[0] < self.min_box_size or box[3] - box[1] < self.min_box_size or bw <= 0 or bh <= 0:
            return None
        return box

    def _report(self) -> None:
        s = self.stats
        dropped = {k: s[k] for k in ("dropped_degenerate_boxes", "dropped_invalid_segmentations") if s[k]}
        if dropped or s["clipped_boxes"]:
            logger.warning("%s: clipped %d boxes to their image; dropped annotations: %s", self.ann_file,
                           s["clipped_boxes"], dropped or "none")  # fmt: skip
        if s["images_without_annotations"]:
            what = "kept, include_empty=True" if self.include_empty else "dropped, include_empty=False"
            logger.info("%s: %d of %d images have no usable non-crowd annotation (%s)", self.ann_file,
                        s["images_without_annotations"], s["images_total"], what)  # fmt: skip

    # ---------------------------------------------------------------- access
    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._records[index]["file_name"]

    def image_info(self, index: int) -> dict:
        """{"id", "file_name", "height", "width"} of the index-th image."""
        return {k: v for k, v in self._records[index].items() if k != "anns"}

    def get_image(self, index: int) -> torch.Tensor:
        """The raw image float [3, H, W] (no transforms, no targets); checks its size against the json."""
        rec = self._records[index]
        path = self.image_path(index)
        image = load_image(path)
        if self.check_image_size and tuple(image.shape[-2:]) != (rec["height"], rec["width"]):
            raise ValueError(f"image {path} is {tuple(image.shape[-2:])} (h, w) but {self.ann_file} says "
                             f"{(rec['height'], rec['width'])} for image id {rec['id']}")  # fmt: skip
        return image

    def get_target(self, index: int) -> Target:
        """Target of the index-th image at its original size (no transforms)."""
        rec = self._records[index]
        h, w = rec["height"], rec["width"]
        masks, boxes, labels = [], [], []
        for ann in rec["anns"]:
            try:
                mask = rasterize(ann["segmentation"], h, w)
            except (ValueError, TypeError) as e:
                where = f"annotation {ann['id']} of image {rec['id']} ({rec['file_name']})"
                raise ValueError(f"{self.ann_file}: {where}: {e}") from e
            if not mask.any():
                self.stats["dropped_empty_masks"] += 1
                logger.warning("%s: annotation %s of image %s rasterises to an empty mask; dropped", self.ann_file,
                               ann["id"], rec["id"])  # fmt: skip
                continue
            masks.append(mask)
            boxes.append(ann["box"])
            labels.append(ann["label"])
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": rec["id"],
            "orig_size": (h, w),
            "size": (h, w),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self.get_image(index)
        target = self.get_target(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"CocoInstances({len(self)} images, {self.num_classes} classes, {self.stats['instances']} instances, "
                f"ann_file={str(self.ann_file)!r})")  # fmt: skip


def collate_fn(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """[(image, target), ...] -> (list of images, list of targets) (images keep their own sizes)."""
    images, targets = [], []
    for image, target in batch:
        images.append(image)
        targets.append(target)
    return images, targets
