"""SetCriterion: per-stage Hungarian matching and weighted set losses, summed over stages (deep supervision)."""
from __future__ import annotations

from typing import Mapping, Sequence

import math

import torch
import torch.distributed as dist
from torch import nn

from istr.losses.terms import LOSSES
from istr.matching.matcher import HungarianMatcher

__all__ = ["SetCriterion", "DEFAULT_LOSSES", "count_boxes"]

DEFAULT_LOSSES: dict[str, float] = {"focal": 2.0, "l1": 5.0, "giou": 2.0, "embed_l2": 2.0, "dice": 2.0}  # paper / v1


def count_boxes(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device | str = "cpu") -> float:
    """Number of target boxes for loss normalisation: the batch total, all-reduced (sum) over ranks and divided
    by the world size when torch.distributed is initialised, clamped to >= 1."""
    total = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(float(total), 1.0)


class SetCriterion(nn.Module):
    """ISTR's training loss. For every stage independently: match (HungarianMatcher) and sum the weighted
    loss terms; the total is the sum over stages with equal weights.

    matcher: a HungarianMatcher. losses: {loss term name: weight} from istr.losses.LOSSES (DEFAULT_LOSSES is
    the paper's; the loss ablation drops "embed_l2" or "dice"; ISTR v2 is {..., "embed_smooth_l1": 1, "dice": 5}).
    Terms with weight 0 are skipped. num_classes: C, checked against the logits and the labels.
    """

    def __init__(self, matcher: HungarianMatcher, losses: Mapping[str, float] | None = None,
                 num_classes: int = 80) -> None:
        super().__init__()
        if not callable(matcher):
            raise TypeError(f"matcher must be callable (a HungarianMatcher), got {type(matcher).__name__}")
        losses = dict(DEFAULT_LOSSES if losses is None else losses)
        if not losses:
            raise ValueError("SetCriterion needs at least one loss term, got an empty dict")
        for name, weight in losses.items():
            LOSSES.get(name)  # KeyError listing the known terms
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"loss weight for {name!r} must be a finite number, got {weight!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.matcher = matcher
        self.losses = {name: float(w) for name, w in losses.items()}
        self.num_classes = num_classes

    def extra_repr(self) -> str:
        return f"losses={self.losses}, num_classes={self.num_classes}"

    def forward(self, stage_outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]],
                codec, denoising: tuple[Sequence[Mapping[str, torch.Tensor]], Sequence[tuple]] | None = None
                ) -> dict[str, torch.Tensor]:
        """stage_outputs: list over stages of {"logits": [B, K, C], "boxes": [B, K, 4] absolute xyxy,
        "mask_embeds": [B, K, l]}; targets: B dicts {"boxes": [T, 4], "labels": int64 [T], "mask_grids":
        [T, M, M], "image_size": [2] (h, w)}; codec: the MaskCodec.

        denoising: optional (stage outputs of the denoising queries, their fixed assignment: per image a pair
        (query indices, target indices)). The same terms are added for them, without matching, normalised by
        the number of denoising queries, and logged as f"{term}_dn_s{stage}" (ISTR(denoising_groups=G)).

        Returns {"loss": scalar total (to backprop), f"{term}_s{stage}": detached weighted component, ...}.
        A non-finite total is returned as is (the trainer decides what to do with it).
        """
        self._check_inputs(stage_outputs, targets)
        targets = self._with_embeds(targets, codec)
        num_boxes = count_boxes(targets, stage_outputs[0]["boxes"].device)
        logs: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=stage_outputs[0]["boxes"].device.type, enabled=False):
            for stage, outputs in enumerate(stage_outputs):
                self._add_terms(logs, f"_s{stage}", outputs, targets, self.matcher(outputs, targets, codec), codec,
                                num_boxes)
            if denoising is not None:
                dn_outputs, dn_indices = denoising
                self._check_inputs(dn_outputs, targets)
                pairs = sum(len(src) for src, _ in dn_indices)
                targets_here = max(sum(len(t["labels"]) for t in targets), 1)
                num_dn = num_boxes * pairs / targets_here  # = num_boxes x G, with the same all-reduce
                for stage, outputs in enumerate(dn_outputs):
                    self._add_terms(logs, f"_dn_s{stage}", outputs, targets, dn_indices, codec, num_dn)
        return {"loss": sum(logs.values()), **{k: v.detach() for k, v in logs.items()}}

    def _add_terms(self, logs: dict, suffix: str, outputs, targets, indices, codec, num_boxes: float) -> None:
        for name, weight in self.losses.items():
            if weight != 0:
                logs[f"{name}{suffix}"] = weight * LOSSES.get(name)(outputs, targets, indices, codec, num_boxes)

    @torch.no_grad()
    def _with_embeds(self, targets, codec) -> list[dict]:
        """Shallow copies of the targets with "mask_embeds" = codec.encode(mask_grids), one encode for the batch.
        Targets that all carry "mask_embeds" already (precomputed by the caller) are used as they are."""
        if all("mask_embeds" in t for t in targets):
            return [dict(t) for t in targets]
        grids = torch.cat([t["mask_grids"] for t in targets])
        if codec is None:
            raise ValueError("SetCriterion needs a codec to encode the target mask_grids")
        embeds = codec.encode(grids)
        embeds = embeds.split([len(t["mask_grids"]) for t in targets])
        return [{**t, "mask_embeds": e} for t, e in zip(targets, embeds)]

    def _check_inputs(self, stage_outputs, targets) -> None:
        if not isinstance(stage_outputs, Sequence) or not stage_outputs:
            raise TypeError(f"stage_outputs must be a non-empty list of per-stage dicts, got {type(stage_outputs).__name__}")
        first = stage_outputs[0]
        for key in ("logits", "boxes", "mask_embeds"):
            if key not in first:
                raise ValueError(f"stage outputs need {key!r}; got keys {sorted(first)}")
        batch, queries, classes = first["logits"].shape
        if classes != self.num_classes:
            raise ValueError(f"logits have {classes} classes, criterion expects num_classes={self.num_classes}")
        if first["boxes"].shape != (batch, queries, 4):
            raise ValueError(f"boxes must be [B, K, 4] = {[batch, queries, 4]}, got {list(first['boxes'].shape)}")
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        for b, t in enumerate(targets):
            missing = {"boxes", "labels", "mask_grids", "image_size"} - set(t)
            if missing:
                raise ValueError(f"target {b} lacks {sorted(missing)}; got keys {sorted(t)}")
            n = len(t["labels"])
            if t["boxes"].shape != (n, 4) or t["mask_grids"].shape[0] != n:
                raise ValueError(f"target {b}: {n} labels but boxes {list(t['boxes'].shape)} and "
                                 f"mask_grids {list(t['mask_grids'].shape)}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target {b}: labels must be int64, got {t['labels'].dtype}")
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel():
            lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one device sync
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{lo}, {hi}]")
