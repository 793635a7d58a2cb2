"""HungarianMatcher: one-to-one assignment of predictions to targets, per image, from a weighted sum of cost terms."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from istr.matching.costs import COSTS

__all__ = ["HungarianMatcher", "DEFAULT_COSTS"]

DEFAULT_COSTS: dict[str, float] = {"focal": 2.0, "l1": 5.0, "giou": 2.0, "cosine": 2.0}  # paper / ISTR v1

_PRED_KEYS = ("logits", "boxes", "mask_embeds")


class HungarianMatcher(nn.Module):
    """Bipartite matching between the K predictions and the T targets of each image (no parameters).

    costs: {cost term name: weight}, terms from istr.matching.COSTS (e.g. DEFAULT_COSTS; the paper's mask-cost
    ablation swaps "cosine" for "embed_l1" or "dice"). Terms with weight 0 are not computed.

    Each image gets its own [K, T] cost matrix, sum_n weight_n * COSTS[n](pred, tgt, codec), solved by
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
                codec=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match the predictions of one stage to the targets.

        Params:
            outputs: {"logits": [B, K, C], "boxes": [B, K, 4] absolute xyxy, "mask_embeds": [B, K, l]}
                (the keys the chosen cost terms read).
            targets: list of B dicts {"boxes": [T_b, 4] absolute xyxy, "labels": int64 [T_b],
                "mask_grids": [T_b, M, M], "mask_embeds": [T_b, l] (optional), "image_size": [2] (h, w)}.
            codec: the MaskCodec, used by the mask cost terms.

        Returns:
            A list of B tuples (pred_idx, tgt_idx) of int64 CPU tensors: prediction pred_idx[j] is matched to
            target tgt_idx[j]. For each image len(pred_idx) = len(tgt_idx) = min(K, T_b), and pred_idx is
            sorted ascending. Images without targets get two empty tensors.

        Raises:
            ValueError if a cost is NaN/inf, naming the cost term(s) and the image.
        """
        batch = self._check_inputs(outputs, targets)
        sizes = [len(t["labels"]) for t in targets]
        if not any(sizes):
            return [_empty_match() for _ in sizes]
        with torch.autocast(device_type=_device_type(outputs), enabled=False):
            try:
                matrices = self._cost_matrices(outputs, targets, sizes, codec, batched=self._batched)
            except ValueError:
                if not self._batched:
                    raise
                # a term refused its input (e.g. the codec on NaN embeddings): redo per image to name the image
                matrices = self._cost_matrices(outputs, targets, sizes, codec, batched=False)
        indices = []
        for b, t in enumerate(sizes):
            if not t:
                indices.append(_empty_match())
            elif not np.isfinite(matrices[b]).all():
                raise ValueError(self._nonfinite_message(self._image_pred(outputs, b), targets[b], codec, b))
            else:
                indices.append(_solve(matrices[b]))
        return indices

    @torch.no_grad()
    def match_one(self, pred: Mapping[str, torch.Tensor], tgt: Mapping[str, torch.Tensor],
                  codec=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Match one image: pred {"logits": [K, C], "boxes": [K, 4], "mask_embeds": [K, l]}, tgt as in forward.
        Returns (pred_idx, tgt_idx) int64 tensors of length min(K, T)."""
        if len(tgt["labels"]) == 0:
            return _empty_match()
        with torch.autocast(device_type=pred["boxes"].device.type, enabled=False):
            matrix = self._total_cost(pred, tgt, codec, 0).cpu().numpy()
        if not np.isfinite(matrix).all():
            raise ValueError(self._nonfinite_message(pred, tgt, codec, 0))
        return _solve(matrix)

    @torch.no_grad()
    def cost_matrix(self, pred: Mapping[str, torch.Tensor], tgt: Mapping[str, torch.Tensor],
                    codec=None) -> torch.Tensor:
        """The weighted total cost [K, T] (float32) of one image, the matrix that forward and match_one solve."""
        with torch.autocast(device_type=pred["boxes"].device.type, enabled=False):
            return self._total_cost(pred, tgt, codec, 0)

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

    def _cost_matrices(self, outputs, targets, sizes: list[int], codec, batched: bool) -> list[np.ndarray | None]:
        """The B weighted cost matrices as numpy [K, T_b] (None where T_b = 0), with one device -> host copy.
        batched: evaluate each group of images (see _groups) in one call per term on targets padded to the group's
        T_max; else one image at a time."""
        groups = self._groups(sizes) if batched else [[b] for b, t in enumerate(sizes) if t]
        blocks = []
        for group in groups:
            if len(group) == 1:
                cost = self._total_cost(self._image_pred(outputs, group[0]), targets[group[0]], codec, group[0])[None]
            else:
                index = torch.tensor(group, device=outputs["boxes"].device)
                whole = group == list(range(len(sizes)))
                pred = {k: v if whole else v.index_select(0, index) for k, v in outputs.items() if k in _PRED_KEYS}
                padded = _PaddedTargets([targets[b] for b in group], sizes[group[0]])
                cost = self._total_cost(pred, padded, codec, f"images {group}")
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

    def _total_cost(self, pred, tgt, codec, image: int | str) -> torch.Tensor:
        total = None
        for name, term, weight in self._terms:
            try:
                cost = term(pred, tgt, codec)
            except ValueError as exc:  # e.g. the codec refusing NaN embeddings
                where = image if isinstance(image, str) else f"image {image}"
                raise ValueError(f"cost term {name!r} failed on {where}: {exc}") from exc
            total = weight * cost if total is None else total.add_(cost, alpha=weight)
        return total

    def _nonfinite_message(self, pred, tgt, codec, image: int) -> str:
        bad = []
        for name, term, weight in self._terms:
            cost = term(pred, tgt, codec)
            if not torch.isfinite(cost).all():
                bad.append(f"{name!r} ({int((~torch.isfinite(cost)).sum())} of {cost.numel()} entries)")
        which = ", ".join(bad) if bad else "the weighted sum (each term alone is finite: overflow)"
        return f"non-finite matching cost in image {image}: cost term(s) {which}; check the predictions for NaN/inf"

    @staticmethod
    def _image_pred(outputs, b: int) -> dict:
        return {k: v[b] for k, v in outputs.items() if k in _PRED_KEYS}

    def _check_inputs(self, outputs, targets) -> int:
        if not isinstance(outputs, Mapping) or "boxes" not in outputs:
            raise TypeError(f"outputs must be a dict with 'logits' [B,K,C], 'boxes' [B,K,4], 'mask_embeds' [B,K,l], "
                            f"got {type(outputs).__name__} with keys {list(outputs) if isinstance(outputs, Mapping) else None}")
        boxes = outputs["boxes"]
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"outputs['boxes'] must be [B, K, 4], got {tuple(boxes.shape)}")
        if not isinstance(targets, Sequence) or len(targets) != boxes.shape[0]:
            n = len(targets) if isinstance(targets, Sequence) else type(targets).__name__
            raise ValueError(f"targets must be a list of {boxes.shape[0]} dicts (one per image), got {n}")
        return boxes.shape[0]


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


def _device_type(outputs) -> str:
    return outputs["boxes"].device.type


def _empty_match() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
