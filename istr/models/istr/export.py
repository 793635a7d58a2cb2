"""ISTR's export head (istr.export): the eval-mode forward as tensors in, fixed top-K tensors out, no Python per image."""
from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import box_convert

from istr.codecs import NotFittedError
from istr.export import ExportHead, clip_boxes
from istr.models.base import topk_over_classes
from istr.models.istr.results import paste_results
from istr.ops.masks import paste_masks_batched

__all__ = ["ISTRExportHead"]


class ISTRExportHead(ExportHead):
    """ISTR.eval() as a graph: images [B, 3, H, W] in [0, 1], sizes [B, 2] -> boxes [B, K, 4] (input pixels,
    clipped), scores, labels, masks [B, K, H, W] (the codec's grids pasted into the clipped boxes, probabilities),
    valid (non-empty clipped boxes: what eager keeps) and mask_grids [B, K, M, M] (the decoded grids, which the
    host pastes at the original size as eager inference does). K = min(detections_per_image, Q x C).

    The same arithmetic as ISTR._infer: the image pool over each image's own region, query boxes scaled to each
    image's size, every stage, top-K over the last stage's (or the averaged) logits, the mask branch on the kept
    queries and the codec's decode without its value checks (check() ran them before tracing)."""

    output_names = ("boxes", "scores", "labels", "masks", "valid", "mask_grids")

    def check(self) -> None:
        model = self.model
        if not model.codec.is_fitted:
            raise NotFittedError(f"the model's {type(model.codec).__name__} is not fitted, so its masks would be "
                                 "meaningless: fit it (model.codec.fit(grids), model.prepare_training(ann)) or load "
                                 "a trained model before exporting")
        model._check_codec()

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "mask_size": int(self.model.codec.mask_size)}

    def _pooled(self, features: list[torch.Tensor], sizes: torch.Tensor) -> torch.Tensor | None:
        """ISTR._pooled with the sizes as a tensor: per level, the mean (or max) over each image's own region
        (the plain mean where the image fills the map, as eager's single-image case)."""
        model = self.model
        if model.image_pool is None:
            return None
        pooled = None
        for f, stride in zip(features, model.strides):
            full = f.mean((2, 3)) if model.image_pool == "avg" else f.amax((2, 3))
            if model.image_pool_padding:
                p = full
            else:
                limit_h = torch.div(sizes[:, 0] + (stride - 1), stride, rounding_mode="floor")  # ceil(h / stride)
                limit_w = torch.div(sizes[:, 1] + (stride - 1), stride, rounding_mode="floor")
                rows = torch.arange(f.shape[2], device=f.device)
                cols = torch.arange(f.shape[3], device=f.device)
                valid = (rows[None, :, None] < limit_h[:, None, None]) & (cols[None, None, :] < limit_w[:, None, None])
                valid = valid[:, None].to(f.dtype)
                if model.image_pool == "avg":
                    masked = (f * valid).sum((2, 3)) / valid.sum((2, 3))
                else:
                    masked = f.masked_fill(valid == 0, float("-inf")).amax((2, 3))
                fills = (limit_h == f.shape[2]) & (limit_w == f.shape[3])
                p = torch.where(fills[:, None], full, masked)
            pooled = p if pooled is None else pooled + p
        return pooled

    def infer(self, batch: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        model = self.model
        features = model.backbone(batch)
        if len(features) != len(model.strides):
            raise ValueError(f"the backbone returned {len(features)} feature maps, expected {len(model.strides)}")
        dtype = features[0].dtype
        h, w = sizes[:, 0].to(dtype), sizes[:, 1].to(dtype)
        wh = torch.stack([w, h, w, h], 1)
        boxes = box_convert(model.query_boxes, "cxcywh", "xyxy")[None] * wh[:, None, :]
        queries = features[0].new_zeros((batch.shape[0], model.num_queries, model.hidden_dim))
        pooled = self._pooled(features, sizes)
        if pooled is not None:
            queries = queries + pooled[:, None, :]
        if model.position_embeddings is not None:
            queries = queries + model.position_embeddings[None]
        stage_outputs = []
        for stage in model.stages:
            queries, logits, new_boxes = stage(features, boxes, queries)
            stage_outputs.append({"logits": logits, "boxes": new_boxes, "queries": queries})
            boxes = new_boxes
        last = model.num_stages - 1
        out = stage_outputs[last]
        logits = out["logits"]
        if model.stage_logit_average:
            first = min(model.logit_average_from, last)
            logits = torch.stack([o["logits"] for o in stage_outputs[first:]]).mean(0)
        scores, labels, query = topk_over_classes(logits, model.detections_per_image)
        top = scores.shape[1]
        gather = lambda x: torch.gather(x, 1, query[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        boxes, queries = gather(out["boxes"]), gather(out["queries"])
        embeds = model.stages[last].mask_embeds(queries, boxes, features)
        m = model.codec.mask_size
        grids = model.codec._decode(embeds.reshape(-1, embeds.shape[-1]).float()).view(-1, top, m, m)
        boxes = clip_boxes(boxes, sizes)
        valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        masks = paste_masks_batched(grids, boxes, batch.shape[2], batch.shape[3])
        return {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks, "valid": valid,
                "mask_grids": grids}

    @classmethod
    def results(cls, outputs: dict[str, torch.Tensor], sizes: list[tuple[int, int]],
                original_sizes: list[tuple[int, int]], metadata: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """The valid detections' grids pasted at each original size by ISTR's own paste_results."""
        detections = []
        for i in range(len(sizes)):
            keep = outputs["valid"][i].bool()
            detections.append({"boxes": outputs["boxes"][i][keep].float(), "labels": outputs["labels"][i][keep].long(),
                               "scores": outputs["scores"][i][keep].float(),
                               "mask_grids": outputs["mask_grids"][i][keep].float()})
        return paste_results(detections, sizes, original_sizes, metadata.get("mask_threshold"))
