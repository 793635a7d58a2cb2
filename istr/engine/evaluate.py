"""evaluate(): the inference loop over a dataset (sharded under torch.distributed), scored by the COCO metric.

The metric itself (results -> COCO json -> pycocotools COCOeval) is istr.engine.coco_metric; its public names are
re-exported here, where they have always been importable from.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, Subset

from istr.checks import check_bool, check_device, check_number
from istr.engine import distributed as dist_utils
from istr.engine.coco_metric import METRIC_NAMES, as_coco, coco_evaluate, results_to_coco, score_results

__all__ = ["results_to_coco", "coco_evaluate", "evaluate", "METRIC_NAMES"]

logger = logging.getLogger(__name__)


class _EvalImages(Dataset):
    """(image float [3, H, W], image_id) over a dataset, skipping target rasterisation where possible."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        base, indices = dataset, None
        if isinstance(dataset, Subset):
            base, indices = dataset.dataset, list(dataset.indices)
        self.fast = base if (hasattr(base, "get_image") and getattr(base, "transforms", None) is None) else None
        self.indices = indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.fast is not None:
            j = self.indices[i] if self.indices is not None else i
            return self.fast.get_image(j), int(self.fast.ids[j])
        image, target = self.dataset[i]
        orig = tuple(target.get("orig_size", image.shape[-2:]))
        if tuple(image.shape[-2:]) != orig:
            raise ValueError(f"evaluation needs images at their original size: image {target['image_id']} "
                             f"is {tuple(image.shape[-2:])} after the dataset's transforms, "
                             f"originally {orig}")  # fmt: skip
        return image, int(target["image_id"])


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def _base_dataset(dataset: Dataset) -> Any:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    all_stages: bool = False,
    results_path: str | Path | None = None,
    progress: bool = True,
    *,
    mask_threshold: float = 0.5,
    iou_types: Sequence[str] = ("bbox", "segm"),
    num_workers: int = 0,
    coco_gt: COCO | str | Path | None = None,
    label_to_category_id: Sequence[int] | Mapping[int, int] | None = None,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Run `model` (eval mode, no grad) over `dataset` and score it with COCOeval.

    dataset: a CocoInstances (or a Subset of one) with no geometric transforms; otherwise pass coco_gt and
    label_to_category_id. Images are scored at their original size; only the dataset's images are evaluated.
    device: where images go (default: the model's parameters' device).
    Returns {"bbox": {"AP", ...}, "segm": {...}}; with all_stages=True the model is called as
    model(images, all_stages=True) (a list over stages of per-image results) and the return also holds
    "stages": [{"bbox": ..., "segm": ...} per stage] (the top level is the last stage).
    results_path: write the (last-stage) COCO results json there (RLE masks, original category ids).
    distributed (default: whether torch.distributed is initialised): every rank must call evaluate; each runs
    its shard (DistributedSampler), results are gathered with all_gather_object, scored on rank 0 and the
    metrics broadcast, so every rank returns the same dict. Pass distributed=False to evaluate the whole
    dataset in this process alone (e.g. when only rank 0 calls it).
    """
    batch_size = check_number("batch_size", batch_size, integer=True, min=1)
    num_workers = check_number("num_workers", num_workers, integer=True, min=0)
    mask_threshold = check_number("mask_threshold", mask_threshold, min=0, max=1)
    all_stages, progress = check_bool("all_stages", all_stages), check_bool("progress", progress)
    if distributed is not None:
        check_bool("distributed", distributed)
    if device is not None:
        device = check_device(device, "device")
    base = _base_dataset(dataset)
    coco_gt = as_coco(coco_gt) if coco_gt is not None else getattr(base, "coco", None)
    if label_to_category_id is None:
        label_to_category_id = getattr(base, "label_to_category_id", None)
    if coco_gt is None or label_to_category_id is None:
        raise ValueError("evaluate needs the ground truth: pass a CocoInstances dataset, "
                         "or coco_gt= and label_to_category_id=")
    _check_categories(model, coco_gt, label_to_category_id)
    if getattr(base, "include_empty", True) is False and getattr(base, "stats", {}).get("images_without_annotations"):
        logger.warning("evaluating without the %d images that have no annotations (dataset built with "
                       "include_empty=False); COCO protocol scores all images",
                       base.stats["images_without_annotations"])  # fmt: skip
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    if distributed and not dist_utils.is_dist():
        raise ValueError("distributed=True but torch.distributed is not initialised")
    use_dist = distributed or distributed is None
    rank, world = (dist_utils.get_rank(), dist_utils.get_world_size()) if use_dist else (0, 1)
    view = _EvalImages(dataset)
    if len(view) == 0:
        raise ValueError("evaluate got an empty dataset")
    sampler = torch.utils.data.DistributedSampler(view, shuffle=False) if world > 1 else None
    loader = DataLoader(view, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=_collate)

    was_training = model.training
    model.eval()
    per_image: dict[int, list[list[dict]]] = {}  # image id -> per stage list of COCO dicts
    try:
        from tqdm.auto import tqdm

        for images, image_ids in tqdm(loader, desc="evaluate", disable=not progress or rank != 0):
            images = [im.to(device) for im in images]
            outputs = model(images, all_stages=True) if all_stages else [model(images)]
            for s, stage_results in enumerate(outputs):
                coco_dicts = results_to_coco(stage_results, image_ids, label_to_category_id, mask_threshold)
                for image_id in image_ids:
                    per_image.setdefault(image_id, [[] for _ in outputs])
                for d in coco_dicts:
                    per_image[d["image_id"]][s].append(d)
    finally:
        model.train(was_training)

    if world > 1:  # DistributedSampler pads with repeats: merging by image id removes them
        gathered = dist_utils.all_gather_object(per_image)
        per_image = {}
        for part in gathered:
            for image_id, stages in part.items():
                per_image.setdefault(image_id, stages)
    metrics: dict[str, Any] = {}
    if rank == 0:
        metrics = score_results(coco_gt, per_image, iou_types, results_path, all_stages)
    if world > 1:
        metrics = dist_utils.broadcast_object(metrics)
    return metrics


def _check_categories(model: torch.nn.Module, coco_gt: COCO, label_to_category_id: Any) -> None:
    """Refuse to score a model against ground truth whose label -> category mapping is not the model's: a different
    class count, or (for a model that carries its training categories) other category ids or names per label. Such
    an evaluation runs without error and reports a meaningless AP (an extra "background" category: 59.5 -> 5.2)."""
    ids = [int(label_to_category_id[i]) for i in range(len(label_to_category_id))] \
        if isinstance(label_to_category_id, Sequence) else None
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and ids is not None and num_classes != len(ids):
        raise ValueError(f"the model predicts {num_classes} classes but the evaluation data has {len(ids)} categories "
                         f"{[coco_gt.cats[i]['name'] for i in ids[:5]]}...: labels would map to the wrong categories")
    categories = getattr(model, "categories", None)
    if categories is None or ids is None:
        return
    data = [{"id": i, "name": str(coco_gt.cats[i]["name"])} for i in ids]
    diffs = [f"label {k}: model {m['id']} {m['name']!r} vs data {d['id']} {d['name']!r}"
             for k, (m, d) in enumerate(zip(categories, data)) if (int(m["id"]), str(m["name"])) != (d["id"], d["name"])]
    if diffs:
        raise ValueError(f"the evaluation data's categories are not the model's ({len(diffs)} labels differ: "
                         f"{'; '.join(diffs[:3])}); evaluate on data with the training set's categories")
