"""ISDA's export head (istr.export): the eval-mode forward as tensors in, fixed top-K tensors out, no Python per image."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from istr.export import ExportHead
from istr.models.base import topk_over_classes
from istr.models.isda.heads import mask_logits, tight_boxes
from istr.models.isda.results import masks_to_results

__all__ = ["ISDAExportHead"]


def _level_masks(sizes: torch.Tensor, padded: tuple[Any, Any], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """istr.models.isda.deformable.level_masks with the sizes as a tensor [B, 2]: True = padding, a level's valid
    extent ceil(h * H_l / H) x ceil(w * W_l / W)."""
    masks = []
    for f in features:
        fh, fw = f.shape[2], f.shape[3]
        limit_h = torch.div(sizes[:, 0] * fh + (padded[0] - 1), padded[0], rounding_mode="floor")
        limit_w = torch.div(sizes[:, 1] * fw + (padded[1] - 1), padded[1], rounding_mode="floor")
        rows = torch.arange(fh, device=f.device)
        cols = torch.arange(fw, device=f.device)
        masks.append((rows[None, :, None] >= limit_h[:, None, None]) | (cols[None, None, :] >= limit_w[:, None, None]))
    return masks


def _stable_descending_order(key: torch.Tensor) -> torch.Tensor:
    """argsort(key, dim=1, descending=True, stable=True) for key [B, K] by pairwise ranks (K is at most a few
    hundred): exporters have no stable sort (ONNX TopK breaks ties by index only by convention)."""
    k = key.shape[1]
    index = torch.arange(k, device=key.device)
    before = (key[:, None, :] > key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & (index[None, None, :] < index[None, :, None]))
    rank = before.sum(-1)  # [B, K]: how many come before element i
    return (rank[:, :, None] == index[None, None, :]).to(torch.int64).argmax(1)  # [B, K]: element at position r


class ISDAExportHead(ExportHead):
    """ISDA.eval() as a graph: images [B, 3, H, W] in [0, 1], sizes [B, 2] -> masks [B, K, H, W] (the kept
    queries' mask probabilities upsampled from the mask stride to the padded input, 0 outside each image), boxes
    (tight boxes of the masks binarised at mask_threshold), scores (class score x maskness), labels, valid.

    The same arithmetic as ISDA._forward / _detections / map_results: top-K over the last decoder layer's Q x C
    scores, maskness, and eager's order: valid detections first, by score (stable), then the rest. valid = a
    non-zero maskness and a non-empty binarised mask on the image."""

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "mask_stride": int(self.model.mask_stride)}

    def infer(self, batch: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        # refused before any work: their per-query RoIAlign boxes and mask centroids are data-dependent
        if model.mask_class is not None:
            raise NotImplementedError("export of ISDA with mask_roi_class=True is not supported yet (its per-query "
                                      "RoIAlign boxes are data-dependent); export a model without it")
        if model.mask_feedback is not None or model.mask_reference:
            raise NotImplementedError("export of ISDA with mask_feedback or mask_reference is not supported yet (their "
                                      "per-query RoIAlign boxes and centroids are data-dependent); export a model "
                                      "without them")
        features = model.backbone(batch)
        if len(features) != 5:
            raise ValueError(f"the backbone returned {len(features)} feature maps, expected 5 (P2..P6)")
        levels = model.transformer_levels(features)
        masks = _level_masks(sizes, (batch.shape[2], batch.shape[3]), levels)
        hs, reference_points, _ = model.transformer(levels, masks)
        mfr = model.mask_features(features[:4], batch)
        logits = model.class_embed(hs)
        kernels = model.kernel_head(hs, reference_points)
        scores, labels, query = topk_over_classes(logits[-1], model.detections_per_image)
        kept = torch.gather(kernels[-1], 1, query[..., None].expand(-1, -1, kernels.shape[-1]))
        probs = mask_logits(kept, mfr).sigmoid()  # [B, K, h, w]
        binary = (probs >= model.mask_threshold).to(probs.dtype)
        maskness = (probs * binary).flatten(2).sum(-1) / binary.flatten(2).sum(-1).clamp(min=1.0)
        scores = scores * maskness
        up = F.interpolate(probs.float(), scale_factor=model.mask_stride, mode="bilinear", align_corners=False)
        rows = torch.arange(up.shape[2], device=up.device)
        cols = torch.arange(up.shape[3], device=up.device)
        inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (cols[None, None, :] < sizes[:, 1, None, None])
        up = up * inside[:, None].to(up.dtype)  # 0 outside each image (probabilities: finite, >= 0)
        threshold = 0.5 if model.mask_threshold is None else model.mask_threshold
        # two passes over the full-resolution masks: a row or column holds a pixel >= threshold iff its max does
        rows_any, cols_any = up.amax(-1) >= threshold, up.amax(-2) >= threshold  # [B, K, H], [B, K, W]
        valid = (maskness > 0) & rows_any.any(-1)
        boxes = tight_boxes(rows_any, cols_any)
        key = torch.where(valid, scores, torch.full_like(scores, -1.0))
        order = _stable_descending_order(key)
        take = lambda x: torch.gather(x, 1, order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x))  # noqa: E731
        b, k = order.shape
        rows = (order + torch.arange(b, device=order.device)[:, None] * k).reshape(-1)  # the masks: whole rows
        masks = up.flatten(0, 1).index_select(0, rows).view(up.shape)
        return {"boxes": take(boxes), "scores": take(scores), "labels": take(labels), "masks": masks,
                "valid": take(valid)}

    @classmethod
    def results(cls, outputs: dict[str, torch.Tensor], sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], metadata: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """map_results after its upsampling: the valid masks cropped to the resized image and resized to the
        original, boxes of the binarised masks, masks empty at the original size dropped."""
        threshold = metadata.get("mask_threshold")
        results = []
        for i, (size, original) in enumerate(zip(sizes, original_sizes)):
            keep = outputs["valid"][i].bool()
            labels, scores = outputs["labels"][i][keep].long(), outputs["scores"][i][keep].float()
            up = outputs["masks"][i][keep].float()  # a copy (boolean indexing): masks_to_results may overwrite it
            results.append(masks_to_results(up[:, : size[0], : size[1]], original, labels, scores, threshold))
        return results
