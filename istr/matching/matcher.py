"""HungarianMatcher: one-to-one assignment of predictions to targets, per image, from a weighted sum of cost terms."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from istr.errors import NonFiniteError
from istr.matching.costs import COSTS, as_context

__all__ = ["HungarianMatcher", "DEFAULT_COSTS"]

DEFAULT_COSTS: dict[str, float] = {"focal": 2.0, "l1": 5.0, "giou": 2.0, "cosine": 2.0}  # paper / ISTR v1


class HungarianMatcher(nn.Module):
    """Bipartite matching between the K predictions and the T targets of each image (no parameters).

    costs: {cost term name: weight}, terms from istr.matching.COSTS (e.g. DEFAULT_COSTS; the paper's mask-cost
    ablation swaps "cosine" for "embed_l1" or "dice"; ISDA is {"focal": 2, "mask_iou": 3}). Terms with weight 0
    are not computed.

    Each image gets its own [K, T] cost matrix, sum_n weight_n * COSTS[n](pred, tgt, context), solved by
    scipy.optimize.linear_sum_assignment; no B*K x sum(T) matrix over the batch is ever built.
    Costs are computed in float32 with autocast disabled and without gradients.

    Execution: when every active term is batched (all built-in ones are), images are grouped by their number of
    targets (padding at most half of a group's matrix; one group when all T are equal) and each group's
    per-image matrices are computed in one call per term on targets padded to the group's T_max,
    [G, K, T_max]; the padding is cut off before solving. This removes most of the per-image Python and
    kernel-launch overhead without DETR's cross-image work. Otherwise images are done one by one.
    Both ways give the same matrices up to float rounding.
    """

    def __init__(self, costs: Mapping[str, float] | None = None) -> None:
        super().__init__()
        costs = dict(DEFAULT_COSTS if costs is None else costs)
        if not costs:
            raise ValueError("HungarianMatcher needs at least one cost term, got an empty dict")
        for name, weight in costs.items():
            COSTS.get(name)  # KeyError listing the known terms
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not np.isfinite(weight) or weight < 0:
                raise ValueError(f"cost weight for {name!r} must be a finite number >= 0, got {weight!r}")
        if all(w == 0 for w in costs.values()):
            raise ValueError(f"all cost weights are zero: {costs}")
        self.costs = {name: float(w) for name, w in costs.items()}
        self._terms = [(name, COSTS.get(name), w) for name, w in self.costs.items() if w != 0]

    def extra_repr(self) -> str:
        return f"costs={self.costs}"

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                context=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match the predictions of one stage to the targets.

        Params:
            outputs: {"logits": [B, K, C], ...} plus the keys the chosen cost terms read, each [B, K, ...]
                (ISTR: "boxes" [B, K, 4] absolute xyxy, "mask_embeds" [B, K, l]; ISDA: "mask_logits" [B, K, h, w]).
            targets: list of B dicts {"labels": int64 [T_b], ...} with the keys the terms read (istr.matching.costs:
                "boxes", "image_size", "mask_grids", "mask_embeds", "masks").
            context: {"codec": MaskCodec} for the embedding terms (a bare codec is accepted), or None.

        Returns:
            A list of B tuples (pred_idx, tgt_idx) of int64 CPU tensors: prediction pred_idx[j] is matched to
            target tgt_idx[j]. For each image len(pred_idx) = len(tgt_idx) = min(K, T_b), and pred_idx is
            sorted ascending. Images without targets get two empty tensors.

        Raises:
            ValueError if a cost is NaN/inf, naming the cost term(s) and the image.
        """
        self._check_inputs(outputs, targets)
        context = as_context(context)
        sizes = [len(t["labels"]) for t in targets]
        if not any(sizes):
            return [_empty_match() for _ in sizes]
        with torch.autocast(device_type=outputs["logits"].device.type, enabled=False):
            try:
                matrices = self._cost_matrices(outputs, targets, sizes, context, batched=self._batched)
            except ValueError:
                if not self._batched:
                    raise
                # a term refused its input (e.g. the codec on NaN embeddings): redo per image to name the image
                matrices = self._cost_matrices(outputs, targets, sizes, context, batched=False)
        indices = []
        for b, t in enumerate(sizes):
            if not t:
                indices.append(_empty_match())
            elif not np.isfinite(matrices[b]).all():
                raise NonFiniteError(self._nonfinite_message(_image_pred(outputs, b), targets[b], context, b))
            else:
                indices.append(_solve(matrices[b]))
        return indices

    @torch.no_grad()
    def match_one(self, pred: Mapping[str, torch.Tensor], tgt: Mapping[str, torch.Tensor],
                  context=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Match one image: pred {"logits": [K, C], ...} (forward's keys without the batch dim), tgt as in forward.
        Returns (pred_idx, tgt_idx) int64 tensors of length min(K, T)."""
        if len(tgt["labels"]) == 0:
            return _empty_match()
        context = as_context(context)
        with torch.autocast(device_type=pred["logits"].device.type, enabled=False):
            matrix = self._total_cost(pred, tgt, context, 0).cpu().numpy()
        if not np.isfinite(matrix).all():
            raise NonFiniteError(self._nonfinite_message(pred, tgt, context, 0))
        return _solve(matrix)

    @torch.no_grad()
    def cost_matrix(self, pred: Mapping[str, torch.Tensor], tgt: Mapping[str, torch.Tensor],
                    context=None) -> torch.Tensor:
        """The weighted total cost [K, T] (float32) of one image, the matrix that forward and match_one solve."""
        with torch.autocast(device_type=pred["logits"].device.type, enabled=False):
            return self._total_cost(pred, tgt, as_context(context), 0)

    # ----------------------------------------------------------------- internals
    @property
    def _batched(self) -> bool:
        return all(getattr(term, "batched", False) for _, term, _ in self._terms)

    @staticmethod
    def _groups(sizes: Sequence[int]) -> list[list[int]]:
        """Images with targets, grouped for batched evaluation: by decreasing T, greedily, while padding stays at
        most half of a group's padded matrix (len(group) * T_max <= 2 * sum T). Equal counts -> one group."""
        order = sorted((b for b, t in enumerate(sizes) if t), key=lambda b: -sizes[b])
        groups: list[list[int]] = []
        for b in order:
            if groups and (len(groups[-1]) + 1) * sizes[groups[-1][0]] <= 2 * (sum(sizes[i] for i in groups[-1]) + sizes[b]):
                groups[-1].append(b)
            else:
                groups.append([b])
        return groups

    def _cost_matrices(self, outputs, targets, sizes: list[int], context, batched: bool) -> list[np.ndarray | None]:
        """The B weighted cost matrices as numpy [K, T_b] (None where T_b = 0), with one device -> host copy.
        batched: evaluate each group of images (see _groups) in one call per term on targets padded to the group's
        T_max; else one image at a time."""
        groups = self._groups(sizes) if batched else [[b] for b, t in enumerate(sizes) if t]
        blocks = []
        for group in groups:
            if len(group) == 1:
                cost = self._total_cost(_image_pred(outputs, group[0]), targets[group[0]], context, group[0])[None]
            else:
                index = torch.tensor(group, device=outputs["logits"].device)
                whole = group == list(range(len(sizes)))
                pred = {k: v if whole else v.index_select(0, index) for k, v in _batched_outputs(outputs).items()}
                padded = _PaddedTargets([targets[b] for b in group], sizes[group[0]])
                cost = self._total_cost(pred, padded, context, f"images {group}")
            blocks.append(cost)
        flat = torch.cat([c.flatten() for c in blocks]).cpu().numpy()
        matrices: list[np.ndarray | None] = [None] * len(sizes)
        offset = 0
        for group, cost in zip(groups, blocks):
            block = flat[offset: offset + cost.numel()].reshape(cost.shape)  # [G, K, T_max of the group]
            offset += cost.numel()
            for b, matrix in zip(group, block):
                matrices[b] = matrix[:, : sizes[b]]
        return matrices

    def _total_cost(self, pred, tgt, context, image: int | str) -> torch.Tensor:
        total = None
        for name, term, weight in self._terms:
            try:
                cost = term(pred, tgt, context)
            except ValueError as exc:  # e.g. the codec refusing NaN embeddings
                where = image if isinstance(image, str) else f"image {image}"
                raise ValueError(f"cost term {name!r} failed on {where}: {exc}") from exc
            total = weight * cost if total is None else total.add_(cost, alpha=weight)
        return total

    def _nonfinite_message(self, pred, tgt, context, image: int) -> str:
        bad = []
        for name, term, weight in self._terms:
            cost = term(pred, tgt, context)
            if not torch.isfinite(cost).all():
                bad.append(f"{name!r} ({int((~torch.isfinite(cost)).sum())} of {cost.numel()} entries)")
        which = ", ".join(bad) if bad else "the weighted sum (each term alone is finite: overflow)"
        return f"non-finite matching cost in image {image}: cost term(s) {which}; check the predictions for NaN/inf"

    def _check_inputs(self, outputs, targets) -> None:
        if not isinstance(outputs, Mapping) or "logits" not in outputs:
            raise TypeError(f"outputs must be a dict with 'logits' [B, K, C] and the tensors the cost terms read, "
                            f"got {type(outputs).__name__} with keys {list(outputs) if isinstance(outputs, Mapping) else None}")
        logits = outputs["logits"]
        if logits.ndim != 3:
            raise ValueError(f"outputs['logits'] must be [B, K, C], got {tuple(logits.shape)}")
        for key in sorted({k for _, term, _ in self._terms for k in getattr(term, "reads", ())}):
            if key not in outputs:
                raise ValueError(f"the cost terms {sorted(self.costs)} need outputs[{key!r}]; got keys {sorted(outputs)}")
            if tuple(outputs[key].shape[:2]) != tuple(logits.shape[:2]):
                raise ValueError(f"outputs[{key!r}] must be [B, K, ...] = {list(logits.shape[:2])} + [...] like the "
                                 f"logits, got {list(outputs[key].shape)}")
        if not isinstance(targets, Sequence) or len(targets) != logits.shape[0]:
            n = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
            raise ValueError(f"targets must be a list of {logits.shape[0]} dicts (one per image), got {n}")


def _batched_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-query tensors of the outputs: those shaped [B, K, ...] like the logits."""
    lead = outputs["logits"].shape[:2]
    return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[:2] == lead}


def _image_pred(outputs: Mapping[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    return {k: v[b] for k, v in _batched_outputs(outputs).items()}


class _PaddedTargets(Mapping):
    """The batch's targets as one dict of tensors padded to T_max, built lazily key by key (only the keys the
    cost terms read are padded). Padding: labels 0, boxes (0, 0, 1, 1) (valid, so GIoU stays finite), others 0;
    "image_size" is stacked to [B, 2]."""

    def __init__(self, targets: Sequence[Mapping[str, torch.Tensor]], t_max: int) -> None:
        self._targets, self._t_max, self._cache = targets, t_max, {}
        self._keys = set.intersection(*(set(t) for t in targets))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._cache:
            values = [torch.as_tensor(t[key]) for t in self._targets]
            if key == "image_size":
                self._cache[key] = torch.stack(values)
            else:
                out = pad_sequence(values, batch_first=True)
                if out.shape[1] < self._t_max:  # every image has fewer than t_max rows of this key
                    out = torch.cat([out, out.new_zeros((len(values), self._t_max - out.shape[1], *out.shape[2:]))], 1)
                if key == "boxes":
                    sizes = torch.tensor([len(v) for v in values], device=out.device)
                    padding = torch.arange(self._t_max, device=out.device) >= sizes[:, None]  # [B, T_max]
                    out[..., 2:] += padding[..., None]
                self._cache[key] = out
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self):
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def _solve(matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = linear_sum_assignment(matrix)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _empty_match() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
