"""ISDA: a deformable DETR decoder gives, per query, class logits and a dynamic 1x1 kernel over a shared
high-resolution mask feature map; set prediction without boxes, codec or NMS (Ying et al., ICASSP 2022)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from istr.io import register_architecture
from istr.models.base import DetectionModel, check_backbone, check_positive_ints, topk_over_classes
from istr.models.isda.deformable import DeformableTransformer, level_masks
from istr.models.isda.heads import (KernelHead, MaskFeatureHead, MaskFeedback, MaskRoIClassifier, mask_centroids,
                                    mask_logits)
from istr.models.isda.results import map_results
from istr.models.isda.targets import mask_targets
from istr.models.transform import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

__all__ = ["ISDA", "ISDA_COSTS", "ISDA_LOSSES"]

ISDA_COSTS = {"focal": 2.0, "mask_iou": 3.0}  # the reference's FocalLossCost + MaskIoUCost
ISDA_LOSSES = {"focal": 2.0, "mask_dice": 3.0}  # sigmoid focal + dice, on every decoder layer


@register_architecture("isda")
class ISDA(DetectionModel):
    """Instance Segmentation with Deformable Attention, from the library's parts.

    model(images, targets=None, all_stages=False) exactly as ISTR: a dict of losses in train mode (targets in
    the torchvision format), results [{"boxes", "labels", "scores", "masks" [N, 1, H, W]}] at the original sizes
    in eval mode; all_stages=True gives every decoder layer's results from one forward.

    backbone: 5 maps P2..P6 (strides 4..64, e.g. istr.models.Backbone with neck="channel_mapper"); the
    transformer reads P3..P6, the mask feature representation (MFR) P2..P5. criterion: a SetCriterion with
    ISDA_COSTS / ISDA_LOSSES (needed only for training); every decoder layer is matched and supervised.
    The poster's ablations are arguments: `mask_stride` 8 | 4 | 2 (MFR resolution), `mask_position`
    (coordinate channels into the MFR, "MP"), `kernel_position` (the reference point in the kernel, "KP").
    `mask_roi_class` (off by default; not in ISDA) adds class logits from the MFR inside each query's own mask
    (MaskRoIClassifier): on the demo's data ISDA's queries found the masks but not the classes without it.
    `mask_roi_size` (default 7) is the side of that classifier's RoIAlign grid.
    `first_level` 3 (ISDA's) feeds the transformer P3..P6; 2 feeds it P2..P5 (an option, not in ISDA: on small
    images the 1/4 map gives the queries finer features to attend to; P6 is then computed but unused).
    `mask_roi_class_gt` > 0 (with mask_roi_class; not in ISDA) also trains that classifier on the ground-truth masks
    themselves: a sigmoid focal term (weight mask_roi_class_gt, / num_boxes) on its logits for every target mask,
    logged as "roi_class_gt", so its classes are taught on right masks from the first step.
    `mask_feedback` (not in ISDA) adds each decoder layer's MFR pooled inside the query's own mask to the query
    before the next layer (MaskFeedback); `mask_reference` (not in ISDA) moves the next layer's reference points
    (and the kernels' positions) to the centroids of the layer's masks (mask_centroids).
    `mask_image_channels` > 0 (not in ISDA) adds an image branch to the MFR (MaskFeatureHead image_channels): detail
    from the input image itself at the mask stride, for small objects and stride 2.
    As in the reference, one class layer and one kernel MLP serve all decoder layers, and the reference points
    come from the query embedding alone (unless mask_reference). Boxes are the tight boxes of the predicted masks. In eval mode images
    are batched only with images of the same padded size (an image's result does not depend on the batch).
    """

    renamed_args = {"mask_dim": "kernel_dim"}  # model files written before the rename
    export_head_class = "istr.models.isda.export:ISDAExportHead"  # istr.export's tensor-in / tensor-out graph

    def __init__(self, backbone: nn.Module, num_classes: int = 80, *, criterion: nn.Module | None = None,
                 hidden_dim: int = 256, num_queries: int = 300, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.1,
                 num_points: int = 4, mask_feat_dim: int = 128, kernel_dim: int = 256, mask_stride: int = 4,
                 mask_position: bool = True, kernel_position: bool = True, num_groups: int = 32,
                 mask_feat_init_std: float | None = 0.01, mask_roi_class: bool = False,
                 mask_roi_class_gt: float = 0.0, mask_roi_size: int = 7, first_level: int = 3,
                 mask_feedback: bool = False, mask_reference: bool = False, mask_image_channels: int = 0,
                 detections_per_image: int = 100, mask_threshold: float = 0.5, prior_prob: float = 0.01,
                 min_size: int = 800, max_size: int = 1333, train_min_sizes: Sequence[int] | None = None,
                 size_divisible: int = 32, pixel_mean: Sequence[float] = IMAGENET_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        check_positive_ints(num_classes=num_classes, num_queries=num_queries, hidden_dim=hidden_dim,
                            num_decoder_layers=num_decoder_layers, detections_per_image=detections_per_image,
                            mask_roi_size=mask_roi_size)
        check_backbone(backbone, hidden_dim, strides=(4, 8, 16, 32, 64))  # P2..P6: Backbone(..., neck="channel_mapper")
        self.backbone, self.criterion = backbone, criterion
        self.num_classes, self.num_queries = num_classes, num_queries
        self.mask_stride, self.detections_per_image, self.mask_threshold = mask_stride, detections_per_image, mask_threshold
        self.transform = ImageTransform(min_size, max_size, train_min_sizes, size_divisible, pixel_mean, pixel_std)
        self.transformer = DeformableTransformer(hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim,
                                                 dropout, num_levels=4, num_points=num_points, num_queries=num_queries)
        self.mask_features = MaskFeatureHead(hidden_dim, mask_feat_dim, kernel_dim, mask_stride, mask_position,
                                             num_groups, mask_feat_init_std, mask_image_channels)
        self.kernel_head = KernelHead(hidden_dim, kernel_dim, kernel_position)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        self.mask_class = (MaskRoIClassifier(kernel_dim, hidden_dim, num_classes, mask_roi_size) if mask_roi_class
                           else None)
        if mask_roi_class_gt < 0 or (mask_roi_class_gt and not mask_roi_class):
            raise ValueError(f"mask_roi_class_gt: expected 0, or a weight > 0 with mask_roi_class=True, got "
                             f"{mask_roi_class_gt!r} (mask_roi_class={mask_roi_class!r})")
        self.mask_roi_class_gt = float(mask_roi_class_gt)
        if first_level not in (2, 3):
            raise ValueError(f"first_level: expected 3 (P3..P6, ISDA's) or 2 (P2..P5), got {first_level!r}")
        self.first_level = first_level
        self.mask_feedback = MaskFeedback(kernel_dim, hidden_dim) if mask_feedback else None
        self.mask_reference = bool(mask_reference)

    def backbone_lr_names(self) -> set[str]:
        """The parameters trained at the backbone's lr multiplier: the trunk's only. The neck (channel mapper) trains
        with the head, as in the authors' recipe (their x0.1 rule matches only the backbone's names)."""
        trunk = getattr(self.backbone, "body", self.backbone)
        prefix = "backbone.body." if trunk is not self.backbone else "backbone."
        return {prefix + name for name, _ in trunk.named_parameters()}

    def transformer_levels(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The four maps the transformer reads from the backbone's P2..P6: P3..P6 (ISDA's) or, with first_level=2,
        P2..P5 (the forward pass and the export head alike)."""
        return list(features[self.first_level - 2:self.first_level + 2])

    # ------------------------------------------------------------------ forward
    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                all_stages: bool = False) -> Any:
        images, original_sizes = self.check_call(images, targets, all_stages, self.class_embed.weight.device)
        if not self.training:  # images of other padded sizes run apart: each result is the image's alone
            return self.grouped_inference(self._infer, images, all_stages)
        return self._forward(images, original_sizes, targets, all_stages)

    def _infer(self, images: list[torch.Tensor], all_stages: bool) -> Any:
        return self._forward(images, [(int(i.shape[-2]), int(i.shape[-1])) for i in images], None, all_stages)

    def _forward(self, images: list[torch.Tensor], original_sizes: list[tuple[int, int]],
                 targets: list[dict[str, torch.Tensor]] | None, all_stages: bool) -> Any:
        device = self.class_embed.weight.device
        batch, sizes = self.transform(images)
        features = self.backbone(batch)
        if len(features) != 5:
            raise ValueError(f"the backbone returned {len(features)} feature maps, expected 5 (P2..P6)")
        levels = self.transformer_levels(features)
        masks = level_masks(sizes, tuple(batch.shape[-2:]), [f.shape[-2:] for f in levels], device=batch.device)
        mfr = self.mask_features(features[:4], batch)  # [B, K, h, w] at mask_stride
        between = self._between_layers(mfr, sizes, tuple(batch.shape[-2:]))
        hs, reference_points, _ = self.transformer(levels, masks, between)  # hs [D, B, Q, d]
        logits = self.class_embed(hs)  # [D, B, Q, C]
        kernels = self.kernel_head(hs, reference_points)  # [D, B, Q, K]
        if self.training:
            layers = []
            for d in range(len(hs)):
                masks_d = mask_logits(kernels[d], mfr)
                layers.append({"logits": self._with_mask_class(logits[d], masks_d, mfr), "mask_logits": masks_d})
            prepared = mask_targets(targets, sizes, tuple(batch.shape[-2:]), self.mask_stride, device)
            if prepared and prepared[0]["masks"].shape[-2:] != layers[0]["mask_logits"].shape[-2:]:
                raise ValueError(f"mask targets {tuple(prepared[0]['masks'].shape[-2:])} and mask logits "
                                 f"{tuple(layers[0]['mask_logits'].shape[-2:])} are on different grids")
            losses = self.criterion(layers, prepared, None)
            return self._roi_class_gt_loss(losses, prepared, mfr) if self.mask_roi_class_gt else losses
        layer_ids = range(len(hs)) if all_stages else [len(hs) - 1]
        logits = {d: self._with_mask_class(logits[d], None if self.mask_class is None else mask_logits(kernels[d], mfr),
                                           mfr) for d in layer_ids}
        results = [map_results(self._detections(logits[d], kernels[d], mfr), sizes, original_sizes, self.mask_threshold,
                               self.mask_stride) for d in layer_ids]
        return results if all_stages else results[0]

    def _between_layers(self, mfr: torch.Tensor, sizes: list[tuple[int, int]], padded: tuple[int, int]) -> Any:
        """The transformer's `between` hook for mask_feedback / mask_reference (None without them): after decoder
        layer d, the layer's masks (its kernels over the MFR) update the queries (MaskFeedback) and/or move the
        reference points to the masks' centroids (mask_centroids) for layer d + 1."""
        if self.mask_feedback is None and not self.mask_reference:
            return None
        ratios = torch.tensor([[w / padded[1], h / padded[0]] for h, w in sizes], dtype=mfr.dtype, device=mfr.device)

        def between(d: int, tgt: torch.Tensor, reference_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            masks = mask_logits(self.kernel_head(tgt, reference_points), mfr)  # [B, Q, h, w]
            if self.mask_feedback is not None:
                tgt = self.mask_feedback(tgt, masks, mfr)
            if self.mask_reference:
                reference_points = mask_centroids(masks, reference_points, ratios)
            return tgt, reference_points

        return between

    def _with_mask_class(self, logits: torch.Tensor, masks: torch.Tensor | None, mfr: torch.Tensor) -> torch.Tensor:
        """A layer's class logits [B, Q, C]; with mask_roi_class plus the MaskRoIClassifier of each query's own mask
        logits `masks` [B, Q, h, w] (matching and inference alike)."""
        return logits if self.mask_class is None else logits + self.mask_class(masks, mfr)

    def _roi_class_gt_loss(self, losses: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
                           mfr: torch.Tensor) -> dict[str, torch.Tensor]:
        """losses plus mask_roi_class_gt x the sigmoid focal loss (alpha 0.25, gamma 2, summed / num_boxes) of the
        MaskRoIClassifier's logits for every target mask (targets: mask_targets' dicts, masks on the MFR's grid)."""
        from torchvision.ops import sigmoid_focal_loss

        from istr.losses import count_boxes

        counts = [len(t["labels"]) for t in targets]
        num_boxes = count_boxes(targets, mfr.device)  # every rank all-reduces, with targets or without
        if not max(counts, default=0):  # a zero still connected to the classifier (as the criterion's terms)
            term = 0.0 * sum(p.sum() for p in self.mask_class.parameters())
            return {**losses, "loss": losses["loss"] + term, "roi_class_gt": term.detach()}
        b, t_max, (h, w) = len(targets), max(counts), mfr.shape[-2:]
        gt = mfr.new_full((b, t_max, h, w), -20.0)  # an absent mask: its logits are never used
        for i, t in enumerate(targets):
            gt[i, :counts[i]] = t["masks"].to(mfr) * 40.0 - 20.0  # sigmoid: 1 inside, 0 outside
        valid = torch.arange(t_max, device=mfr.device)[None] < torch.tensor(counts, device=mfr.device)[:, None]
        logits = self.mask_class(gt, mfr)[valid].float()  # [T, C]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        onehot = torch.zeros_like(logits).scatter_(1, labels[:, None], 1.0)
        term = self.mask_roi_class_gt * sigmoid_focal_loss(logits, onehot, reduction="sum") / num_boxes
        return {**losses, "loss": losses["loss"] + term, "roi_class_gt": term.detach()}

    def _detections(self, logits: torch.Tensor, kernels: torch.Tensor, mfr: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Top detections of one decoder layer: top-k over Q x C sigmoid scores (a query may give several
        classes), masks = sigmoid(kernel . MFR) of the kept queries, scores x maskness (the mean probability
        inside the mask binarised at mask_threshold, as SOLOv2), re-sorted; queries whose mask is empty are dropped
        -> per image {"labels", "scores", "mask_maps"}."""
        scores, labels, query = topk_over_classes(logits, self.detections_per_image)
        b = scores.shape[0]
        kept = torch.gather(kernels, 1, query[..., None].expand(-1, -1, kernels.shape[-1]))  # [B, top, K]
        probs = mask_logits(kept, mfr).sigmoid_()  # [B, top, h, w]; in place: the same values, one copy fewer
        binary = (probs >= self.mask_threshold).to(probs.dtype)
        area = binary.flatten(2).sum(-1).clamp(min=1.0)
        maskness = binary.mul_(probs).flatten(2).sum(-1) / area  # probs * binary, in place
        scores = scores * maskness
        detections = []
        for i in range(b):
            keep = torch.nonzero(maskness[i] > 0).flatten()
            keep = keep[scores[i][keep].argsort(descending=True, stable=True)]
            detections.append({"labels": labels[i][keep], "scores": scores[i][keep], "mask_maps": probs[i][keep]})
        return detections
