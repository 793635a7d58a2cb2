"""What the train loop needs of its data: batches on the device, categories adopted, files checked, paths recorded."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Subset

__all__ = ["to_device", "IndexedCollate", "default_collate", "adopt_categories", "check_dataset_files", "val_paths"]


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    """Images and the tensors of the targets on `device` (non-blocking)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def default_collate(batch):
    """istr.data.collate_fn (imported when first used)."""
    from istr.data import collate_fn

    return collate_fn(batch)


class IndexedCollate:
    """Collate (dataset index, sample) pairs: (indices, collate_fn(samples)), so errors can name the images."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch):
        return [i for i, _ in batch], self.collate_fn([sample for _, sample in batch])


def val_paths(dataset: Any) -> dict[str, str]:
    """{"val_images", "val_ann"} of a COCO validation set (istr eval RUN reads them), else {}."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    images, ann = getattr(base, "image_dir", None), getattr(base, "ann_file", None)
    if images is None or ann is None:
        return {}
    return {"val_images": str(Path(images).resolve()), "val_ann": str(Path(ann).resolve())}


def adopt_categories(model: nn.Module, dataset: Any) -> None:
    """Give the model the dataset's label -> category mapping (saved with it), refusing a different one."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    ids, names = getattr(base, "label_to_category_id", None), getattr(base, "category_names", None)
    if ids is None or names is None or not hasattr(model, "categories"):
        return
    categories = [{"id": int(i), "name": str(n)} for i, n in zip(ids, names)]
    num_classes = getattr(model, "num_classes", len(categories))
    if num_classes != len(categories):
        raise ValueError(f"the model predicts {num_classes} classes but the training set has {len(categories)} "
                         f"categories: build it with num_classes={len(categories)}")
    if model.categories is not None and model.categories != categories:
        raise ValueError("the model's categories differ from the training set's: "
                         f"model {model.categories[:3]}... vs data {categories[:3]}...")
    model.categories = categories


def check_dataset_files(dataset: Any) -> None:
    """Let a dataset that can check its files (CocoInstances.check_files) do so before the first step."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    indices = list(dataset.indices) if isinstance(dataset, Subset) else None
    check = getattr(base, "check_files", None)
    if callable(check):
        check(indices)
