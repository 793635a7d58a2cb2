"""COCO-format instance segmentation dataset: images + boxes/labels/full-image masks, with clear errors for bad data."""
from __future__ import annotations

import contextlib
import io
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from istr.checks import check_bool, check_choice, check_number
from istr.fileio import read_json
from istr.ops.masks import rasterize

__all__ = ["CocoInstances", "collate_fn", "load_image", "pil_to_tensor", "image_tensor", "load_coco_json",
           "read_coco_annotations", "describe_stats", "mask_inside_box", "segmentation_problem", "segmentation_bbox",
           "MAX_IMAGE_PIXELS"]

logger = logging.getLogger(__name__)

# Images are untrusted input: a file whose header claims more pixels than this (width * height) is refused before it
# is decoded (a 100,000 x 100,000 PNG is a few KB on disk and 120 GB as a float tensor). 89,478,485 is PIL's own
# warning threshold (about 9,459 x 9,459; 1 GB as a float [3, H, W]). Set istr.data.coco.MAX_IMAGE_PIXELS to a larger
# value for large trusted images (PIL refuses images over twice its own PIL.Image.MAX_IMAGE_PIXELS: raise that too),
# or to None to turn the check off.
MAX_IMAGE_PIXELS: int | None = 89_478_485


def _check_pixels(width: int, height: int, name: str) -> None:
    limit = MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ValueError(f"image {name} is {width} x {height} = {width * height:,} pixels, over the limit of "
                         f"{limit:,} pixels for untrusted images (istr.data.coco.MAX_IMAGE_PIXELS: raise it for large "
                         "trusted images)")

Target = dict[str, Any]
Transforms = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as RGB float [3, H, W] in [0, 1] (PIL; modes converted as pil_to_tensor does).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for an empty or undecodable one,
    or one whose header claims more than MAX_IMAGE_PIXELS pixels (checked before decoding; one line naming the
    file, its size and the limit). PIL rather than torchvision.io: torchvision's image decoders are deprecated
    since 0.29.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked here instead
            with Image.open(path) as pil:
                _check_pixels(*pil.size, f"file {path}")
                pil.load()
                mode, array = _pil_array(pil)
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused inside Image.open
        limit = MAX_IMAGE_PIXELS if MAX_IMAGE_PIXELS is not None else Image.MAX_IMAGE_PIXELS
        raise ValueError(f"image file {path} is refused: {e}; the limit for untrusted images is {limit:,} pixels "
                         "(istr.data.coco.MAX_IMAGE_PIXELS and PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot decode image file {path}: {e}") from e
    except ValueError as e:
        if str(e).startswith("image file "):
            raise
        raise ValueError(f"cannot decode image file {path}: {e}") from e
    except MemoryError:
        raise MemoryError(f"not enough memory to decode image file {path}") from None
    return _array_to_tensor(array, mode, str(path))


def pil_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image -> RGB float [3, H, W] in [0, 1].

    8-bit modes (L, RGB, RGBA/LA (alpha dropped), P, CMYK, 1, YCbCr, ...) are converted to RGB and divided by 255;
    16-bit grayscale (I;16*) is divided by 65535, as is 32-bit integer grayscale (I, what some readers give 16-bit
    files) whose values fit in [0, 65535]; 32-bit float grayscale (F) is taken as is when in [0, 1] and divided by
    255 when in [0, 255]. Other I/F ranges raise ValueError (convert such images to 8 or 16 bits first).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    _check_pixels(*image.size, "(PIL image)")
    mode, array = _pil_array(image)
    return _array_to_tensor(array, mode, "PIL image")


def image_tensor(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """An image tensor [C, H, W] (C = 1 or 3) as float32 RGB [3, H, W] in [0, 1], scaled by its dtype's range:
    uint8 / 255, uint16 / 65535 (16-bit images), bool as 0/1; floating point is taken as is (and must already
    lie in [0, 1]). Other integer dtypes (int16/int32/int64: no fixed pixel range) raise TypeError saying how
    to convert. `name` names the image in the errors."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [3, H, W], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"{name} must be a tensor [3, H, W] (or [1, H, W]), got shape {tuple(image.shape)}")
    _check_pixels(image.shape[2], image.shape[1], name)
    if image.dtype == torch.uint8:
        out = image.float() / 255.0
    elif image.dtype == getattr(torch, "uint16", None):
        out = image.float() / 65535.0
    elif image.dtype == torch.bool:
        out = image.float()
    elif image.is_floating_point():
        out = image.float()
    else:
        raise TypeError(f"{name} has dtype {image.dtype}, whose pixel range istr cannot know: give uint8 (0..255), "
                        "uint16 (0..65535) or a float tensor in [0, 1] (e.g. image.float() / image_max)")
    return out.expand(3, -1, -1) if out.shape[0] == 1 else out


def _pil_array(pil: Any) -> tuple[str, np.ndarray]:
    """(mode, array): the 16/32-bit integer or float grayscale array [H, W] as it is, else uint8 RGB [H, W, 3]."""
    if pil.mode.startswith(("I", "F")):
        return pil.mode, np.array(pil)
    return pil.mode, np.array(pil.convert("RGB"), dtype=np.uint8)


def _array_to_tensor(array: np.ndarray, mode: str, name: str) -> torch.Tensor:
    if array.dtype == np.uint8 and array.ndim == 3:
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
    values = array.astype(np.float32)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F":
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: float image (PIL mode F) with non-finite pixels")
        if lo >= 0 and hi <= 1:
            scale = 1.0
        elif lo >= 0 and hi <= 255:
            scale = 255.0
        else:
            raise ValueError(f"{name}: float image (PIL mode F) with values in [{lo:g}, {hi:g}]; expected [0, 1] or "
                             "[0, 255]: rescale it to an 8 or 16-bit image first")
    else:  # I;16, I;16B, I;16L, I;16N, I
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: integer image (PIL mode {mode}) with values in [{lo:g}, {hi:g}]; expected "
                             "16-bit values in [0, 65535]: rescale it to an 8 or 16-bit image first")
        scale = 65535.0
    return torch.from_numpy(values / scale)[None].expand(3, -1, -1).contiguous()


def load_coco_json(ann_file: str | Path) -> COCO:
    """Load and validate a COCO instances json -> pycocotools COCO (silently, no prints).

    Errors name the file and say what is wrong: missing file, invalid JSON (with line/column), missing top-level
    keys, annotations pointing at unknown images or categories, duplicate ids.
    """
    path = Path(ann_file)
    data = read_json(path, "annotation file")
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


# ------------------------------------------------------------------------------------------ the annotation reader
ANNOTATION_STATS: tuple[str, ...] = (
    "annotations_total", "crowd_annotations", "boxes_from_segmentation", "clipped_boxes",
    "dropped_degenerate_boxes", "dropped_invalid_segmentations", "instances")  # fmt: skip


def segmentation_problem(seg: Any, h: int, w: int) -> str | None:
    """None if `seg` is a usable COCO segmentation for an h x w image, else what is wrong with it."""
    if isinstance(seg, list):  # (coordinates are checked when rasterised: checking each here costs seconds on COCO)
        if not all(isinstance(p, list) for p in seg):
            return "polygons must be lists of coordinates"
        if not any(len(p) >= 6 for p in seg):
            return "no polygon with >= 3 points"
        return None
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "an RLE needs 'counts' and 'size'"
        if not isinstance(seg["size"], (list, tuple)) or list(seg["size"]) != [h, w]:
            return f"RLE size {seg['size']!r} differs from the image size {[h, w]}"
        if not isinstance(seg["counts"], (str, bytes, list)):
            return f"RLE counts must be a string or a list, got {type(seg['counts']).__name__}"
        return None
    return f"expected a polygon list or an RLE dict, got {type(seg).__name__}"


def segmentation_bbox(seg: list | dict, h: int, w: int) -> list[float]:
    """[x, y, w, h] bounds of a valid segmentation: the polygons' bounds (as COCO's own boxes), or the RLE's."""
    if isinstance(seg, list):
        xs = [v for p in seg if len(p) >= 6 for v in p[0::2]]
        ys = [v for p in seg if len(p) >= 6 for v in p[1::2]]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
    return [float(v) for v in mask_utils.toBbox(rle)]


def read_coco_annotations(coco: COCO, *, min_box_size: float = 1.0,
                          include_crowd: bool = False) -> tuple[list[dict], dict[str, int]]:
    """The one reader of a loaded COCO json (load_coco_json), used by CocoInstances and codec fitting alike.

    Returns (images, stats). images: one {"id", "file_name", "height", "width", "anns"} per json image, in id
    order; "anns" lists the usable annotations as {"id", "category_id", "iscrowd", "box": [x0, y0, x1, y1] (floats,
    clipped to the image), "segmentation"}. One policy, counted in stats (ANNOTATION_STATS):
    crowd annotations (iscrowd=1) are left out unless include_crowd ("crowd_annotations" counts them either way);
    a missing or unusable segmentation (no polygon with >= 3 points, an RLE whose size is not the image's, ...) is
    dropped ("dropped_invalid_segmentations"); a missing bbox is taken from the segmentation (COCO allows it;
    "boxes_from_segmentation"); the box is clipped to the image ("clipped_boxes") and dropped when the clipped box
    is narrower or shorter than min_box_size pixels, or the json box is malformed or empty
    ("dropped_degenerate_boxes"). "instances" counts what is kept. Masks that rasterise empty are found only when
    rasterised: CocoInstances and coco_mask_grids drop them then ("dropped_empty_masks"), and so are masks with no
    pixel inside their box (the box-cropped target would be empty: "dropped_box_misses_mask"; mask_inside_box).
    """
    min_box_size = check_number("min_box_size", min_box_size, min=0)
    include_crowd = check_bool("include_crowd", include_crowd)
    stats = dict.fromkeys(ANNOTATION_STATS, 0)
    images = []
    for img in sorted(coco.dataset["images"], key=lambda im: im["id"]):
        h, w = int(img["height"]), int(img["width"])
        anns = []
        for ann in coco.imgToAnns.get(img["id"], []):
            stats["annotations_total"] += 1
            crowd = bool(ann.get("iscrowd", 0))
            if crowd:
                stats["crowd_annotations"] += 1
                if not include_crowd:
                    continue
            seg = ann.get("segmentation")
            if segmentation_problem(seg, h, w) is not None:
                stats["dropped_invalid_segmentations"] += 1
                continue
            bbox = ann.get("bbox")
            if bbox is None:
                try:
                    bbox = segmentation_bbox(seg, h, w)
                except (TypeError, ValueError):  # coordinates that are not numbers, an undecodable RLE
                    stats["dropped_invalid_segmentations"] += 1
                    continue
                stats["boxes_from_segmentation"] += 1
            box = _clip_box(bbox, h, w, min_box_size, stats)
            if box is None:
                stats["dropped_degenerate_boxes"] += 1
                continue
            anns.append({"id": ann["id"], "category_id": ann["category_id"], "iscrowd": int(crowd), "box": box,
                         "segmentation": seg})  # fmt: skip
        stats["instances"] += len(anns)
        images.append({"id": int(img["id"]), "file_name": img["file_name"], "height": h, "width": w, "anns": anns})
    return images, stats


def _clip_box(bbox: Any, h: int, w: int, min_box_size: float, stats: dict[str, int]) -> list[float] | None:
    """COCO [x, y, w, h] -> xyxy clipped to the image, or None when malformed, empty or thinner than min_box_size."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return None
    x0, y0, bw, bh = (float(v) for v in bbox)
    box = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x0 + bw, 0.0), w), min(max(y0 + bh, 0.0), h)]
    if box != [x0, y0, x0 + bw, y0 + bh]:
        stats["clipped_boxes"] += 1
    if box[2] - box[0] < min_box_size or box[3] - box[1] < min_box_size or bw <= 0 or bh <= 0:
        return None
    return box


def mask_inside_box(mask: np.ndarray, box: Sequence[float]) -> bool:
    """Whether a full-image mask [H, W] has a pixel inside `box` (xyxy, pixels the box touches): False means the
    mask cropped by that box (a model's target, a codec's training grid) is empty."""
    h, w = mask.shape[-2:]
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    return x1 > x0 and y1 > y0 and bool(mask[..., y0:y1, x0:x1].any())


def describe_stats(stats: dict[str, int]) -> str:
    """One line summarising an annotation-reader stats dict (read_coco_annotations, CocoInstances.stats,
    coco_mask_grids(..., return_stats=True)): kept, skipped and dropped counts."""
    parts = [f"{stats.get('instances', 0)} of {stats.get('annotations_total', 0)} annotations used"]
    for key, text in (("crowd_annotations", "crowd"), ("boxes_from_segmentation", "boxes taken from the mask"),
                      ("clipped_boxes", "boxes clipped to the image"),
                      ("dropped_degenerate_boxes", "dropped: degenerate box"),
                      ("dropped_invalid_segmentations", "dropped: invalid segmentation"),
                      ("dropped_empty_masks", "dropped: empty mask"),
                      ("dropped_box_misses_mask", "dropped: box does not cover its mask")):
        if stats.get(key):
            parts.append(f"{stats[key]} {text}")
    return ", ".join(parts)


class CocoInstances(Dataset):
    """COCO-format instance segmentation dataset.

    `dataset[i] -> (image, target)`: image float [3, H, W] in [0, 1]; target {"boxes": float [N, 4] absolute xyxy,
    "labels": int64 [N] in [0, C), "masks": uint8 [N, H, W], "image_id": int, "orig_size": (h, w) of the file,
    "size": (h, w) after transforms}. Crowd regions (iscrowd=1) are left out of the targets (COCOeval still uses
    them through `dataset.coco`). COCO category ids map to contiguous labels sorted by id:
    `label_to_category_id[label]`, `category_id_to_label[cat_id]`, `category_names[label]`.

    Annotations are read by read_coco_annotations, the policy codec fitting (coco_mask_grids) shares: boxes come
    from the json bbox (from the segmentation when the json has none), clipped to the image; an annotation whose
    clipped box is narrower or shorter than `min_box_size` pixels, or whose segmentation is missing/invalid, is
    dropped (counts in `dataset.stats`, plus one logged warning). An instance whose mask rasterises empty is
    dropped when loaded (counted in `stats["dropped_empty_masks"]`, per process). Images without any usable
    non-crowd annotation are dropped unless `include_empty=True` (the paper drops them for training; use
    include_empty=True for COCO-protocol evaluation, which scores false positives on such images too).
    `transforms(image, target) -> (image, target)` (see istr.data.transforms) runs after loading.
    segmentations=True adds target["segmentations"], each instance's COCO polygon list (or RLE), for the authors'
    polygon target crop (ISTR(target_crop="polygon")); transforms then flip the polygons with the image (the
    crop augmentation is refused).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Transforms | None = None,
        include_empty: bool = False,
        min_box_size: float = 1.0,
        check_image_size: bool = True,
        segmentations: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        self.min_box_size = float(check_number("min_box_size", min_box_size, min=0))
        if transforms is not None and not callable(transforms):
            raise TypeError(f"transforms must be callable (image, target) -> (image, target), got "
                            f"{type(transforms).__name__}")
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_empty = check_bool("include_empty", include_empty)
        self.check_image_size = check_bool("check_image_size", check_image_size)
        self.segmentations = check_bool("segmentations", segmentations)
        self.coco = load_coco_json(self.ann_file)

        cats = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_category_id: list[int] = [int(c["id"]) for c in cats]
        self.category_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_category_id)}
        self.category_names: list[str] = [str(c["name"]) for c in cats]

        self.stats: dict[str, int] = dict.fromkeys(
            ["images_total", "images", "images_without_annotations", *ANNOTATION_STATS, "dropped_empty_masks",
             "dropped_box_misses_mask"], 0)
        self._records = self._build_records()
        self.ids: list[int] = [r["id"] for r in self._records]
        self._report()

    # ---------------------------------------------------------------- index building
    def _build_records(self) -> list[dict]:
        images, reader_stats = read_coco_annotations(self.coco, min_box_size=self.min_box_size)
        self.stats.update(reader_stats)
        records = []
        for img in images:
            for ann in img["anns"]:
                ann["label"] = self.category_id_to_label[ann["category_id"]]
            if not img["anns"]:
                self.stats["images_without_annotations"] += 1
                if not self.include_empty:
                    continue
            records.append(img)
        self.stats["images_total"] = len(images)
        self.stats["images"] = len(records)
        return records

    def _report(self) -> None:
        s = self.stats
        if s["dropped_degenerate_boxes"] or s["dropped_invalid_segmentations"] or s["clipped_boxes"]:
            logger.warning("%s: %s (dropped annotations are not targets)", self.ann_file, describe_stats(s))
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

    def check_files(self, indices: Sequence[int] | None = None, level: str = "exists") -> None:
        """Check the image files (of `indices`, default all) before training, so a bad file does not stop a run at
        an arbitrary iteration. level:
        "exists" (default): FileNotFoundError listing the files that are missing or empty (a stat per file);
        "header": also open each with PIL and read its header: ValueError listing the files PIL cannot identify,
            whose size differs from the json's or exceeds MAX_IMAGE_PIXELS, or whose structure PIL's verify()
            finds damaged (PNG chunk CRCs: a fraction of a millisecond per image);
        "decode": decode every image fully, as training will (load_image; milliseconds per image).
        The ValueError counts the bad files and names the first three with their reasons.
        """
        check_choice("level", level, ("exists", "header", "decode"))
        missing = []
        items = list(range(len(self)) if indices is None else indices)
        for i in items:
            path = self.image_path(i)
            try:
                if path.stat().st_size == 0:
                    missing.append(f"{path} (empty)")
            except OSError:
                missing.append(str(path))
        if missing:
            raise FileNotFoundError(f"{len(missing)} image files of {self.ann_file} are missing or empty under "
                                    f"{self.image_dir}, e.g. {missing[:3]}")
        if level == "exists":
            return
        bad = []
        for i in items:
            problem = self._image_problem(i, level == "decode")
            if problem:
                bad.append(f"{self.image_path(i)}: {problem}")
        if bad:
            raise ValueError(f"{len(bad)} of {len(items)} image files of {self.ann_file} cannot be used: "
                             + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))

    def _image_problem(self, index: int, decode: bool) -> str | None:
        """None when the index-th image file is usable (header level, or fully decoded), else why not."""
        import warnings

        from PIL import Image

        rec, path = self._records[index], self.image_path(index)
        if decode:
            try:
                self.get_image(index)
            except (ValueError, OSError) as exc:
                return " ".join(str(exc).split())
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as pil:
                    w, h = pil.size
                    _check_pixels(w, h, f"file {path}")
                    pil.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged files
            return " ".join(f"{type(exc).__name__}: {exc}".split())
        if self.check_image_size and (h, w) != (rec["height"], rec["width"]):
            return f"{h} x {w} (h x w) but the json says {rec['height']} x {rec['width']}"
        return None

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
        masks, boxes, labels, segmentations = [], [], [], []
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
            if not mask_inside_box(mask, ann["box"]):
                self.stats["dropped_box_misses_mask"] += 1
                logger.warning("%s: annotation %s of image %s: its box %s covers no pixel of its mask (the "
                               "box-cropped mask target would be empty); dropped", self.ann_file, ann["id"], rec["id"],
                               [round(v, 1) for v in ann["box"]])  # fmt: skip
                continue
            masks.append(mask)
            boxes.append(ann["box"])
            labels.append(ann["label"])
            segmentations.append(ann["segmentation"])
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": rec["id"],
            "orig_size": (h, w),
            "size": (h, w),
        }
        if self.segmentations:
            target["segmentations"] = segmentations
        return target

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
