"""The COCO metric: per-image results -> COCO json (RLE masks, original category ids) -> pycocotools COCOeval."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from istr.checks import check_number
from istr.data.results import validate_coco_results
from istr.fileio import atomic_write_bytes

# the COCO reader's own rules for a usable segmentation (the training reader drops the same annotations)
from istr.data.coco import segmentation_bbox, segmentation_problem

__all__ = ["results_to_coco", "coco_evaluate", "as_coco", "score_results", "METRIC_NAMES"]

logger = logging.getLogger(__name__)

# order of COCOeval.stats for bbox/segm
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _category_lookup(label_to_category_id: Sequence[int] | Mapping[int, int]):
    if isinstance(label_to_category_id, Mapping):
        return lambda label: label_to_category_id[label]
    table = list(label_to_category_id)
    return lambda label: table[label]


def results_to_coco(
    results: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int] | Mapping[int, int],
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Per-image model results -> COCO result dicts.

    results[i]: {"boxes": [N, 4] xyxy (original pixels), "labels": int [N] contiguous, "scores": [N],
    optional "masks": [N, 1, H, W] or [N, H, W] probabilities (binarised at >= mask_threshold) or bool/uint8}.
    Returns [{"image_id", "category_id" (original COCO id), "score", "bbox": [x, y, w, h] from the predicted
    boxes, "segmentation": compressed RLE with counts as str (if masks given)}], in input order.
    """
    mask_threshold = check_number("mask_threshold", mask_threshold, min=0, max=1)
    if len(results) != len(image_ids):
        raise ValueError(f"got {len(results)} results but {len(image_ids)} image ids")
    to_category = _category_lookup(label_to_category_id)
    out: list[dict] = []
    for result, image_id in zip(results, image_ids):
        boxes = torch.as_tensor(result["boxes"]).detach().float().cpu().reshape(-1, 4)
        labels = torch.as_tensor(result["labels"]).detach().cpu().reshape(-1).tolist()
        scores = torch.as_tensor(result["scores"]).detach().float().cpu().reshape(-1).tolist()
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"image {image_id}: boxes/labels/scores lengths differ: "
                             f"{len(boxes)}/{len(labels)}/{len(scores)}")
        rles = _encode_masks(result["masks"], len(labels), mask_threshold, image_id) if "masks" in result else None
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for k, (label, score) in enumerate(zip(labels, scores)):
            try:
                category_id = int(to_category(int(label)))
            except (IndexError, KeyError) as e:
                raise ValueError(f"image {image_id}: label {label} has no category id in label_to_category_id") from e
            entry = {"image_id": int(image_id), "category_id": category_id, "score": float(score),
                     "bbox": [float(v) for v in xywh[k].tolist()]}  # fmt: skip
            if rles is not None:
                entry["segmentation"] = rles[k]
            out.append(entry)
    return out


def _encode_masks(masks: Any, n: int, threshold: float, image_id: int) -> list[dict]:
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"image {image_id}: masks must be [{n}, 1, H, W] or [{n}, H, W], got {tuple(masks.shape)}")
    binary = masks if masks.dtype == torch.bool else masks >= threshold
    if n == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array
    rles = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def as_coco(coco_gt: COCO | str | Path | dict) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, Path)):
        from istr.data.coco import load_coco_json

        return load_coco_json(coco_gt)
    if isinstance(coco_gt, dict):
        coco = COCO()
        coco.dataset = copy.deepcopy(coco_gt)
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    raise TypeError(f"coco_gt must be a pycocotools COCO, a json path or a dict, got {type(coco_gt).__name__}")


def _complete_ground_truth(coco_gt: COCO, iou_type: str) -> COCO:
    """The ground truth as COCOeval needs it for `iou_type`: coco_gt itself when nothing is missing, else a copy.

    COCOeval needs "bbox", "area" and "iscrowd" on every GT annotation, and for "segm" a segmentation it can
    rasterise; COCO files may leave bbox and area to be derived from the segmentation (as istr's reader does).
    Missing values are filled (bbox and area from the segmentation, area from the box when the segmentation is
    unusable, iscrowd 0). For "segm", annotations whose segmentation is unusable (no polygon with >= 3 points, an
    RLE of another size, ...) are left out, with a warning; the training reader drops them too. ValueError naming
    the annotations that have neither a bbox nor a usable segmentation.
    """
    anns, images = coco_gt.dataset["annotations"], coco_gt.imgs

    def usable(a: dict) -> bool:
        img = images[a["image_id"]]
        return segmentation_problem(a.get("segmentation"), int(img["height"]), int(img["width"])) is None

    unusable = [a["id"] for a in anns if iou_type == "segm" and not usable(a)]
    if not unusable and all("bbox" in a and "area" in a and "iscrowd" in a for a in anns):
        return coco_gt
    if unusable:
        logger.warning("segm evaluation leaves out %d ground-truth annotations whose segmentation cannot be "
                       "rasterised (annotation ids %s)", len(unusable), unusable[:5])
    filled, hopeless, skip = [], [], set(unusable)
    for a in anns:
        if a["id"] in skip:
            continue
        a = dict(a)
        a.setdefault("iscrowd", 0)
        img = images[a["image_id"]]
        h, w = int(img["height"]), int(img["width"])
        ok = usable(a)
        if "bbox" not in a and ok:
            a["bbox"] = segmentation_bbox(a["segmentation"], h, w)
        if "area" not in a and ok:
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w))
            else:
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
            a["area"] = float(mask_utils.area(rle))
        elif "area" not in a and "bbox" in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        if "bbox" not in a or "area" not in a:
            hopeless.append(a["id"])
        filled.append(a)
    if hopeless:
        raise ValueError(f"{len(hopeless)} ground-truth annotations have neither a bbox nor a usable segmentation "
                         f"to derive one from (annotation ids {hopeless[:5]}); COCOeval cannot score them")
    complete = COCO()
    complete.dataset = {**coco_gt.dataset, "annotations": filled}
    with contextlib.redirect_stdout(io.StringIO()):
        complete.createIndex()
    return complete


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """COCO.loadRes on a deep copy (loadRes mutates its input); an empty list gives an empty result set."""
    if not results:
        empty = COCO()
        empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(coco_gt.dataset["categories"])}  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            empty.createIndex()
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(copy.deepcopy(results))


def _as_results(coco_results: Sequence[dict] | str | Path) -> tuple[list[dict], str]:
    """COCO results (a list of dicts, or the path of a results json such as evaluate(results_path=...) writes)."""
    if isinstance(coco_results, (str, Path)):
        from istr.fileio import read_json

        path = Path(coco_results)
        coco_results = read_json(path, "results file")
        where = f"results file {path}"
        if isinstance(coco_results, dict):
            raise ValueError(f"{where}: expected a JSON list of detections [{{\"image_id\", \"category_id\", "
                             f"\"score\", ...}}], got an object with keys {sorted(coco_results)[:8]} (a ground-truth "
                             "file? pass it as coco_gt)")
    else:
        where = "coco_results"
        if isinstance(coco_results, (dict, bytes)) or not isinstance(coco_results, Iterable):
            raise TypeError(f"coco_results must be a list of result dicts or a results json path, got "
                            f"{type(coco_results).__name__}")
    results = list(coco_results)
    for i, r in enumerate(results):
        if not isinstance(r, dict) or any(k not in r for k in ("image_id", "category_id", "score")):
            raise ValueError(f"{where}[{i}] must be an object with keys 'image_id', 'category_id', 'score' (and "
                             f"'bbox' and/or 'segmentation'), got {r!r:.200}")
    return results, where


def coco_evaluate(
    coco_gt: COCO | str | Path | dict,
    coco_results: Sequence[dict] | str | Path,
    iou_types: Sequence[str] = ("bbox", "segm"),
    img_ids: Sequence[int] | None = None,
    per_category: bool = False,
    verbose: bool = False,
    bbox_area: str = "box",
) -> dict[str, dict[str, Any]]:
    """pycocotools COCOeval of COCO-format results -> {iou_type: {"AP", "AP50", ..., "ARl"}} (fractions in [0, 1];
    -1 where no ground truth falls in that area range, as COCOeval reports).

    coco_gt: a pycocotools COCO, a dict, or the path of a COCO instances json. coco_results: a list of COCO result
    dicts or the path of a results json (as evaluate(results_path=...) writes).
    img_ids: images to score (default: every GT image). Empty results give AP 0 without crashing. Results on
    images or categories absent from the GT raise ValueError. For "segm" any "bbox" key is removed first so that
    COCOeval's small/medium/large split of detections uses mask area (as detectron2 does). For "bbox" the
    results' boxes are used (derived from the RLEs when results carry none); the detections' area for the
    small/medium/large split is the box area (bbox_area="box", as loadRes and detectron2 do) or the mask area
    (bbox_area="mask", what loadRes does for mask-only results). Only APs/APm/APl can differ between the two.
    per_category=True adds {"per_category": {category name: AP}}; verbose=True prints COCOeval's summary.
    """
    coco_gt = as_coco(coco_gt)
    results, where = _as_results(coco_results)
    gt_images, gt_cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    bad_images = sorted({r["image_id"] for r in results} - gt_images)
    bad_cats = sorted({r["category_id"] for r in results} - gt_cats)
    if bad_images:
        raise ValueError(f"{len(bad_images)} result image ids are not in the ground truth, e.g. {bad_images[:5]}")
    if bad_cats:
        raise ValueError(f"result category ids {bad_cats[:10]} are not in the ground truth categories")
    for iou_type in iou_types:
        if iou_type == "segm" and any("segmentation" not in r for r in results):
            missing = sum("segmentation" not in r for r in results)
            raise ValueError(f"{missing} results have no 'segmentation'; cannot compute segm AP")
    # every detection's score, box and mask checked before pycocotools sees them (errors name index and field)
    results = validate_coco_results(results, coco_gt, tuple(iou_types), where=where)
    img_ids = sorted(gt_images) if img_ids is None else [int(i) for i in img_ids]
    if bbox_area not in ("box", "mask"):
        raise ValueError(f"bbox_area must be 'box' or 'mask', got {bbox_area!r}")
    metrics: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        typed = results
        if iou_type == "segm":
            missing = sum("segmentation" not in r for r in results)
            if missing:
                raise ValueError(f"{missing} results have no 'segmentation'; cannot compute segm AP")
            typed = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        gt = _complete_ground_truth(coco_gt, iou_type)
        coco_dt = _load_results(gt, typed)
        if iou_type == "bbox" and bbox_area == "mask":
            for ann in coco_dt.dataset["annotations"]:
                if isinstance(ann.get("segmentation"), dict):
                    ann["area"] = float(mask_utils.area(ann["segmentation"]))
        evaluator = COCOeval(gt, coco_dt, iou_type)
        evaluator.params.imgIds = img_ids
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        if verbose:
            print(f"COCOeval {iou_type}:\n{summary.getvalue()}")
        metrics[iou_type] = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
        if per_category:
            metrics[iou_type]["per_category"] = _per_category_ap(gt, evaluator)
    return metrics


def _per_category_ap(coco_gt: COCO, evaluator: COCOeval) -> dict[str, float]:
    precision = evaluator.eval["precision"]  # [T IoUs, R recalls, K categories, A areas, M maxDets]
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else float("nan")
    return out


def score_results(coco_gt: COCO, per_image: Mapping[int, list[list[dict]]], iou_types: Sequence[str] = ("bbox", "segm"),
                  results_path: str | Path | None = None, all_stages: bool = False) -> dict[str, Any]:
    """COCOeval of per-image, per-stage COCO result dicts ({image id: [stage 0 dicts, stage 1 dicts, ...]}): the last
    stage's metrics at the top level, every stage's under "stages" with all_stages; the last stage's results are
    written to results_path (a COCO results json) when given. Only the images in per_image are scored."""
    image_ids = sorted(per_image)
    num_stages = max((len(v) for v in per_image.values()), default=1)
    stage_results = [[d for i in image_ids for d in per_image[i][s]] for s in range(num_stages)]
    if results_path is not None:
        atomic_write_bytes(results_path, json.dumps(stage_results[-1]).encode())
    stages = [coco_evaluate(coco_gt, r, iou_types, img_ids=image_ids) for r in stage_results]
    metrics: dict[str, Any] = dict(stages[-1])
    if all_stages:
        metrics["stages"] = stages
    return metrics
