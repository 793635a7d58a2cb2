"""Shared pieces of the checkpoint converters: safe loading, the strict conversion report, COCO's 80 categories."""
from __future__ import annotations

import argparse
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from istr.fileio import check_readable_file

__all__ = ["COCO_CATEGORIES", "COCO_CATEGORY_IDS", "ConversionReport", "load_source_checkpoint", "source_state_dict",
           "top_level_dropped", "fill_target", "as_target_dtype"]

# COCO 2017's 80 instance categories in id order: contiguous label j (0..79) = the j-th id in this list (ids sorted),
# the order CocoInstances and the authors' detectron2 COCO registration both use.
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": n} for i, n in [
        (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
        (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
        (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
        (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
        (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
        (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
        (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
        (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
        (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
        (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
        (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
        (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
        (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
        (89, "hair drier"), (90, "toothbrush")]]
COCO_CATEGORY_IDS: list[int] = [c["id"] for c in COCO_CATEGORIES]


@dataclass
class ConversionReport:
    """What a conversion did, key by key. Every source key is in `mapped` or `dropped`; every target tensor is in
    `filled` or `fresh` (a conversion that cannot say so fails instead of returning a report)."""

    source: str
    source_path: str
    target: str  # the model preset (or class) the weights went to
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> target key
    dropped: dict[str, str] = field(default_factory=dict)  # source key or top-level entry -> why
    filled: dict[str, str] = field(default_factory=dict)  # target key -> where it came from
    fresh: dict[str, str] = field(default_factory=dict)  # target key -> how it was initialised
    conventions: list[str] = field(default_factory=list)  # conversions of meaning (channels, classes, codec...)
    notes: list[str] = field(default_factory=list)

    def summary(self, max_lines: int = 12) -> str:
        """A human-readable account: counts, the dropped and freshly initialised keys grouped by prefix."""
        lines = [f"converted {self.source} checkpoint {self.source_path} -> {self.target}",
                 f"  source keys mapped: {len(self.mapped)}, knowingly dropped: {len(self.dropped)}",
                 f"  target tensors filled: {len(self.filled)}, freshly initialised: {len(self.fresh)}"]
        for title, entries in (("dropped", self.dropped), ("freshly initialised", self.fresh)):
            groups = _group(entries)
            if groups:
                lines.append(f"  {title}:")
                lines += [f"    {g} ({n} {'key' if n == 1 else 'keys'}): {why}"
                          for g, (n, why) in list(groups.items())[:max_lines]]
                if len(groups) > max_lines:
                    lines.append(f"    ... and {len(groups) - max_lines} more groups")
        if self.conventions:
            lines.append("  conventions:")
            lines += [f"    - {c}" for c in self.conventions]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_path": self.source_path, "target": self.target,
                "mapped": dict(self.mapped), "dropped": dict(self.dropped), "filled": dict(self.filled),
                "fresh": dict(self.fresh), "conventions": list(self.conventions), "notes": list(self.notes)}

    def __str__(self) -> str:
        return self.summary()


def _group(entries: Mapping[str, str]) -> dict[str, tuple[int, str]]:
    """Keys with the same reason grouped under their common prefix (numbers folded): {prefix: (count, reason)}."""
    import re

    groups: dict[tuple[str, str], int] = {}
    for key, why in entries.items():
        parts = re.sub(r"\.\d+(?=\.|$)", ".N", key).split(".")
        prefix = ".".join(parts[:3]) + ("*" if len(parts) > 3 else "")
        groups[(prefix, why)] = groups.get((prefix, why), 0) + 1
    return {p: (n, why) for (p, why), n in groups.items()}


# ---------------------------------------------------------------------------------------------------- loading
def load_source_checkpoint(path: str | Path, what: str, trust_pickle: bool = False) -> Any:
    """torch.load a source checkpoint on the CPU, safely (weights_only; argparse.Namespace allowed, as Deformable
    DETR stores its args in one). FileNotFoundError / IsADirectoryError / PermissionError for a missing or
    unreadable path; ValueError naming the file when it is truncated, corrupt or not a PyTorch checkpoint, or holds
    objects weights_only refuses (then `trust_pickle=True`, for a file you trust, unpickles it fully)."""
    path = check_readable_file(path, what)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is a safetensors file, not a {what}: the converters read the authors' .pth "
                         "checkpoints (an istr model file needs no conversion: istr.load_model)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a {what}")
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc).lower() or "weights only" in str(exc).lower():
            raise ValueError(f"{path} holds Python objects that a safe load refuses ({str(exc).splitlines()[0]}); "
                             "if you trust the file, convert it with trust_pickle=True (CLI: --trust-pickle)") from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({what}): {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({what}; truncated or corrupt?): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def source_state_dict(ckpt: Any, path: str | Path, what: str,
                      entries: tuple[str, ...] = ("model",)) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a loaded checkpoint (its first entry named in `entries`: "model" for detectron2 and DETR
    files, "state_dict" for mmdetection's) as tensors (a DistributedDataParallel "module." prefix removed), and the
    names of its other top-level entries. ValueError when there is no such dict of tensors (naming what there is
    instead)."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected a {what} "
                         "(a dict with a 'model' state dict)")
    entry = next((e for e in entries if e in ckpt), None)
    if entry is None and "state_dict" in ckpt:
        meta = ckpt.get("meta")
        hint = " (an mmdetection checkpoint: 'meta' + 'state_dict')" if isinstance(meta, Mapping) else ""
        raise ValueError(f"{path} has a 'state_dict' entry but no 'model' entry{hint}; expected a {what} "
                         "(a dict with a 'model' state dict)")
    if entry is None:
        raise ValueError(f"{path} has no {' or '.join(repr(e) for e in entries)} entry (top-level keys: "
                         f"{sorted(map(str, ckpt))[:10]}); expected a {what} (a dict with a 'model' state dict)")
    model = ckpt[entry]
    if not isinstance(model, Mapping) or not model:
        raise ValueError(f"{path}: {entry!r} is a {type(model).__name__}{' (empty)' if not model else ''}, "
                         f"not a state dict of tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {entry} entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors, [str(k) for k in ckpt if k != entry]


def top_level_dropped(names: Iterable[str], known: Mapping[str, str], path: str | Path, what: str) -> dict[str, str]:
    """{"<name>": why} for the checkpoint's entries beside "model"; ValueError for one a `what` never holds."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{path}: unexpected top-level entries {unknown} beside 'model' (a {what} holds "
                         f"{sorted(['model', *known])})")
    return {f"<{n}>": known[n] for n in names}


def fill_target(target_state: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor],
                fresh: Mapping[str, str], path: str | Path, what: str) -> None:
    """Check a conversion against the target's state dict: every converted tensor has a target of the same shape,
    every target tensor is converted or listed in `fresh`. ValueError naming the keys otherwise."""
    unknown = sorted(set(converted) - set(target_state))
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target_state[k].shape)}"
              for k, v in converted.items() if k in target_state and v.shape != target_state[k].shape]
    unfilled = sorted(set(target_state) - set(converted) - set(fresh))
    if unknown or shapes or unfilled:
        raise ValueError(f"{path} does not fit the model as a {what}: shape mismatches {shapes[:8]}, "
                         f"converted tensors the model lacks {unknown[:8]}, model tensors left unfilled "
                         f"{unfilled[:8]}")


def as_target_dtype(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` in the dtype of `like` (float16/float64 checkpoints become the model's float32); not copied."""
    return value.detach().to(dtype=like.dtype)  # the model's load_state_dict copies it

