"""Fingerprints that tell whether a resumed run still trains on the same data (annotation file, image list)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

__all__ = ["dataset_fingerprint", "compare_fingerprints", "file_sha256"]

_NAMES = {"length": "number of training samples", "ann_sha256": "annotation file content (sha256)",
          "images_sha256": "list of training images", "indices_sha256": "subset indices"}


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _text_sha256(items: Any) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


def dataset_fingerprint(dataset: Any) -> dict[str, Any]:
    """{"length", and for a COCO-style dataset (ann_file, image_info) "ann_file", "ann_sha256", "images_sha256",
    for a Subset "indices_sha256"}: plain JSON values."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    out: dict[str, Any] = {"length": len(dataset)}
    ann = getattr(base, "ann_file", None)
    if ann is not None and Path(ann).is_file():
        out["ann_file"] = str(ann)
        out["ann_sha256"] = file_sha256(ann)
    info = getattr(base, "image_info", None)
    if callable(info):
        out["images_sha256"] = _text_sha256(info(i).get("file_name") for i in range(len(base)))
    if isinstance(dataset, Subset):
        out["indices_sha256"] = _text_sha256(dataset.indices)
    return out


def compare_fingerprints(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One 'what: checkpoint X vs now Y' line per differing fingerprint entry present in both."""
    diffs = []
    for key, what in _NAMES.items():
        if key in saved and key in now and saved[key] != now[key]:
            a, b = saved[key], now[key]
            if isinstance(a, str) and len(a) > 12:
                a, b = a[:12] + "...", str(b)[:12] + "..."
            where = f" ({now.get('ann_file')})" if key == "ann_sha256" else ""
            diffs.append(f"training data changed since the checkpoint: {what}{where}: checkpoint {a} vs now {b}")
    return diffs
