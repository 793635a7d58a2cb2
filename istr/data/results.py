"""COCO results (detections) validated before scoring: every field of every detection, with errors naming both.

pycocotools scores whatever it is given: a NaN score sorts first (AP 1.000 for garbage), an RLE of the wrong size
or with garbage counts is scored (or read out of bounds), a 3-number bbox or a string score ends in a traceback
deep inside COCOeval. `validate_coco_results` checks each detection against the ground truth first:
    image_id     an int naming a ground-truth image
    category_id  an int naming a ground-truth category
    score        a finite real number (bools and strings refused)
    bbox         (when present; required for iou_type "bbox" unless a segmentation gives it) [x, y, w, h]: four
                 finite numbers, w and h >= 0
    segmentation (required for "segm") an RLE {"size": [h, w], "counts"} whose size is its image's and whose counts
                 decode to exactly h * w pixels (compressed COCO strings are decoded here, in numpy, before
                 pycocotools sees them: its C decoder trusts the counts), or polygons (lists of >= 6 finite numbers)
A ValueError says "<where>[i] (field): what is wrong", e.g. "results file r.json[3] (score): must be a finite
number, got nan (float)".
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["validate_coco_results", "rle_string_counts"]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:77] + '...' if len(text) > 80 else text} ({type(value).__name__})"


def rle_string_counts(counts: str | bytes) -> np.ndarray | None:
    """The run lengths int64 [K] of a compressed COCO RLE string (pycocotools' rleFrString, in numpy), or None when
    the string is malformed (a character outside '0'..'o', a value cut off at the end of the string)."""
    raw = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else bytes(counts), dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    c = raw.astype(np.int64) - 48
    if c.min() < 0 or c.max() > 63:
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last value is cut off: its last character says more follow
    ends = np.flatnonzero(~more)  # index of each value's last character
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    k = np.arange(c.size) - starts[group]  # position of each character inside its value
    if k.max() > 12:  # > 60 bits: no real count is that long
        return None
    x = np.zeros(ends.size, dtype=np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    negative = (c[ends] & 0x10) != 0
    x[negative] |= -(1 << (5 * (k[ends][negative] + 1)))
    counts_out = x.copy()
    # delta coding: counts[m] = x[m] + counts[m - 2] for m > 2 (counts 0, 1 and 2 are stored as they are)
    for parity in (1, 0):
        idx = np.arange(parity if parity == 1 else 2, ends.size, 2)
        if idx.size:
            counts_out[idx] = np.cumsum(x[idx])
    return counts_out


def _check_rle(seg: dict, h: int, w: int) -> str | None:
    """None if `seg` is an RLE of an h x w mask whose counts decode to h * w pixels, else what is wrong."""
    if "size" not in seg or "counts" not in seg:
        return f"an RLE needs 'size' and 'counts', got keys {sorted(seg)}"
    size = seg["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        return f"RLE size must be [height, width], got {_show(size)}"
    if [int(size[0]), int(size[1])] != [h, w]:
        return f"RLE size {list(size)} differs from its image's size [{h}, {w}]"
    counts = seg["counts"]
    if isinstance(counts, (str, bytes)):
        try:
            runs = rle_string_counts(counts)
        except (UnicodeEncodeError, ValueError):
            runs = None
        if runs is None:
            return "RLE counts are not a valid compressed COCO RLE string"
    elif isinstance(counts, list):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in counts):
            return "uncompressed RLE counts must be a list of ints"
        runs = np.asarray(counts, dtype=np.int64)
    else:
        return f"RLE counts must be a string (compressed) or a list of ints, got {type(counts).__name__}"
    if runs.size and runs.min() < 0:
        return "RLE counts decode to a negative run length"
    total = int(runs.sum())
    if total != h * w:
        return f"RLE counts cover {total} pixels, its size [{h}, {w}] has {h * w}"
    return None


def _check_polygons(seg: list) -> str | None:
    if not seg or not all(isinstance(p, list) for p in seg):
        return "polygons must be a non-empty list of coordinate lists"
    for p in seg:
        if len(p) < 6 or len(p) % 2 or not all(_finite(v) for v in p):
            return "each polygon must be an even-length list of >= 6 finite numbers"
    return None


def validate_coco_results(results: Iterable[Any], coco_gt: Any, iou_type: str | Sequence[str] = ("bbox", "segm"),
                          where: str = "coco_results") -> list[dict]:
    """`results` as a list after checking every detection against `coco_gt` (a pycocotools COCO, or a dict with
    "images" and "categories") for the IoU type(s) `iou_type` ("bbox", "segm" or both); see the module docstring
    for the rules. `where` names the results in the errors (e.g. "results file runs/r.json").

    ValueError "<where>[i] (field): ..." for the first bad detection; TypeError when results is not a list of dicts.
    """
    iou_types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {t!r}")
    dataset = getattr(coco_gt, "dataset", coco_gt)
    if not isinstance(dataset, dict) or "images" not in dataset or "categories" not in dataset:
        raise TypeError(f"coco_gt must be a pycocotools COCO or a COCO dict with 'images' and 'categories', got "
                        f"{type(coco_gt).__name__}")
    sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in dataset["images"]}
    categories = {c["id"] for c in dataset["categories"]}
    if isinstance(results, (dict, str, bytes)) or not isinstance(results, Iterable):
        raise TypeError(f"{where} must be a list of detections, got {type(results).__name__}")
    results = list(results)
    for i, r in enumerate(results):
        def bad(field: str, text: str) -> ValueError:
            return ValueError(f"{where}[{i}] ({field}): {text}")

        if not isinstance(r, dict):
            raise bad("detection", f"must be an object with 'image_id', 'category_id', 'score', got {_show(r)}")
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise bad(key, f"missing (the detection has keys {sorted(r)})")
        image_id, category_id, score = r["image_id"], r["category_id"], r["score"]
        if not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool):
            raise bad("image_id", f"must be an int, got {_show(image_id)}")
        if image_id not in sizes:
            raise bad("image_id", f"{image_id} is not an image of the ground truth")
        if not isinstance(category_id, numbers.Integral) or isinstance(category_id, bool):
            raise bad("category_id", f"must be an int, got {_show(category_id)}")
        if category_id not in categories:
            raise bad("category_id", f"{category_id} is not a category of the ground truth "
                                     f"(ids {sorted(categories)[:10]})")
        if not _finite(score):
            raise bad("score", f"must be a finite number, got {_show(score)}")
        bbox = r.get("bbox")
        if "bbox" in r:
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
                raise bad("bbox", f"must be [x, y, width, height], four finite numbers, got {_show(bbox)}")
            if bbox[2] < 0 or bbox[3] < 0:
                raise bad("bbox", f"width and height must be >= 0, got {_show(bbox)}")
        if "segmentation" in r:
            seg = r["segmentation"]
            if isinstance(seg, dict):
                problem = _check_rle(seg, *sizes[image_id])
            elif isinstance(seg, list):
                problem = _check_polygons(seg)
            else:
                problem = f"must be an RLE {{'size', 'counts'}} or a list of polygons, got {_show(seg)}"
            if problem:
                raise bad("segmentation", problem)
        elif "segm" in iou_types:
            raise bad("segmentation", "missing: segm AP needs a mask for every detection")
        if "bbox" in iou_types and "bbox" not in r and "segmentation" not in r:
            raise bad("bbox", "missing: bbox AP needs a box (or a segmentation to derive it from)")
    return results
