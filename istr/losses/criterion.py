"""SetCriterion: per-stage (per-layer) Hungarian matching and weighted set losses, summed (deep supervision)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import math

import torch
import torch.distributed as dist
from torch import nn

from istr.losses.terms import LOSSES
from istr.matching.costs import as_context, with_target_embeds
from istr.matching.matcher import HungarianMatcher

__all__ = ["SetCriterion", "DEFAULT_LOSSES", "count_boxes", "criterion_config", "criterion_from_config"]

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
    """The set loss of both model families. For every stage (ISTR) or decoder layer (ISDA) independently: match
    (HungarianMatcher) and sum the weighted loss terms; the total is the sum over stages with equal weights.

    matcher: a HungarianMatcher. losses: {loss term name: weight} from istr.losses.LOSSES (DEFAULT_LOSSES is
    ISTR's paper setting; the loss ablation drops "embed_l2" or "dice"; ISTR v2 is {..., "embed_smooth_l1": 1,
    "dice": 5}; ISDA is {"focal": 2, "mask_dice": 3}). Terms with weight 0 are skipped. num_classes: C, checked
    against the logits and the labels.
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
                context=None, denoising: tuple[Sequence[Mapping[str, torch.Tensor]], Sequence[tuple]] | None = None
                ) -> dict[str, torch.Tensor]:
        """stage_outputs: list over stages of {"logits": [B, K, C], ...} with the keys the terms read (ISTR:
        "boxes" [B, K, 4] absolute xyxy, "mask_embeds" [B, K, l]; ISDA: "mask_logits" [B, K, h, w]); targets: B
        dicts {"labels": int64 [T], ...} (istr.losses.targets); context: {"codec": MaskCodec} for ISTR's terms
        (a bare codec is accepted), None for ISDA's. Target "mask_embeds" are encoded once here when a codec is
        given and the targets carry only "mask_grids".

        denoising: optional (stage outputs of the denoising queries, their fixed assignment: per image a pair
        (query indices, target indices)). The same terms are added for them, without matching, normalised by
        the number of denoising queries, and logged as f"{term}_dn_s{stage}" (ISTR(denoising_groups=G)).

        Returns {"loss": scalar total (to backprop), f"{term}_s{stage}": detached weighted component, ...}.
        A non-finite total is returned as is (the trainer decides what to do with it).
        """
        context = as_context(context)
        self._check_inputs(stage_outputs, targets)
        targets = with_target_embeds(targets, context.get("codec"))
        device = stage_outputs[0]["logits"].device
        num_boxes = count_boxes(targets, device)
        logs: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for stage, outputs in enumerate(stage_outputs):
                indices = self.matcher(outputs, targets, context)
                self._add_terms(logs, f"_s{stage}", outputs, targets, indices, context, num_boxes)
            if denoising is not None:
                dn_outputs, dn_indices = denoising
                self._check_inputs(dn_outputs, targets)
                pairs = sum(len(src) for src, _ in dn_indices)
                targets_here = max(sum(len(t["labels"]) for t in targets), 1)
                num_dn = num_boxes * pairs / targets_here  # = num_boxes x G, with the same all-reduce
                for stage, outputs in enumerate(dn_outputs):
                    self._add_terms(logs, f"_dn_s{stage}", outputs, targets, dn_indices, context, num_dn)
        return {"loss": sum(logs.values()), **{k: v.detach() for k, v in logs.items()}}

    def _add_terms(self, logs: dict, suffix: str, outputs, targets, indices, context, num_boxes: float) -> None:
        for name, weight in self.losses.items():
            if weight != 0:
                logs[f"{name}{suffix}"] = weight * LOSSES.get(name)(outputs, targets, indices, context, num_boxes)

    def _reads(self) -> tuple[set[str], set[str]]:
        """The output and target keys the active loss and cost terms need."""
        from istr.matching.costs import COSTS

        terms = [LOSSES.get(n) for n, w in self.losses.items() if w]
        terms += [COSTS.get(n) for n, w in getattr(self.matcher, "costs", {}).items() if w]
        outputs = {"logits"} | {k for t in terms for k in getattr(t, "reads", ())}
        targets = {"labels"} | {k for t in terms for k in getattr(t, "target_reads", ())}
        return outputs, targets

    def _check_inputs(self, stage_outputs, targets) -> None:
        if not isinstance(stage_outputs, Sequence) or not stage_outputs:
            raise TypeError(f"stage_outputs must be a non-empty list of per-stage dicts, got {type(stage_outputs).__name__}")
        first = stage_outputs[0]
        output_keys, target_keys = self._reads()
        missing = sorted(output_keys - set(first))
        if missing:
            raise ValueError(f"the loss and cost terms {sorted(self.losses)} need outputs {missing}; "
                             f"got keys {sorted(first)}")
        batch, queries, classes = first["logits"].shape
        if classes != self.num_classes:
            raise ValueError(f"logits have {classes} classes, criterion expects num_classes={self.num_classes}")
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) != (batch, queries):
                raise ValueError(f"outputs[{key!r}] must be [B, K, ...] = [{batch}, {queries}, ...] like the logits, "
                                 f"got {list(value.shape)}")
        if "boxes" in first and first["boxes"].shape[-1] != 4:
            raise ValueError(f"boxes must be [B, K, 4], got {list(first['boxes'].shape)}")
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} images")
        for b, t in enumerate(targets):
            missing = sorted(target_keys - set(t))
            if missing:
                raise ValueError(f"target {b} lacks {missing} (needed by the loss and cost terms); got keys {sorted(t)}")
            n = len(t["labels"])
            for key, value in t.items():
                if key not in ("labels", "image_size") and isinstance(value, torch.Tensor) and value.shape[:1] != (n,):
                    raise ValueError(f"target {b}: {n} labels but {key} {list(value.shape)}")
            if "boxes" in t and t["boxes"].shape != (n, 4):
                raise ValueError(f"target {b}: boxes must be [{n}, 4], got {list(t['boxes'].shape)}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target {b}: labels must be int64, got {t['labels'].dtype}")
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel():
            lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one device sync
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{lo}, {hi}]")


def criterion_config(criterion: nn.Module | None) -> dict[str, Any] | None:
    """{"losses": {...}, "costs": {...}} of a SetCriterion and its HungarianMatcher (None for other criteria)."""
    losses = getattr(criterion, "losses", None)
    costs = getattr(getattr(criterion, "matcher", None), "costs", None)
    if not isinstance(losses, dict) or not isinstance(costs, dict):
        return None
    return {"losses": dict(losses), "costs": dict(costs)}


def criterion_from_config(config: dict[str, Any] | None, num_classes: int) -> SetCriterion | None:
    """The SetCriterion that criterion_config described (None stays None)."""
    if config is None:
        return None
    return SetCriterion(HungarianMatcher(config["costs"]), config["losses"], num_classes)
