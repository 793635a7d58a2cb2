"""Set-loss terms: a registry of functions (one stage's outputs, targets, matching, context, num_boxes) -> scalar.

Call contract of every loss term (look terms up with LOSSES.get(name) or list them with LOSSES.list()):

    term(outputs, targets, indices, context, num_boxes) -> scalar Tensor (unweighted; SetCriterion weights it)

    outputs: one stage (ISTR) or decoder layer (ISDA), {"logits": [B, K, C], ...}: ISTR adds "boxes" [B, K, 4]
             absolute xyxy and "mask_embeds" [B, K, l]; ISDA adds "mask_logits" [B, K, h, w]
    targets: list of B dicts {"labels": int64 [T_b], ...} (istr.losses.targets): ISTR adds "boxes" [T_b, 4]
             absolute xyxy, "mask_grids" [T_b, M, M] in [0, 1], "mask_embeds" [T_b, l] = codec.encode(mask_grids),
             "image_size" [2] (h, w); ISDA adds "masks" [T_b, h, w] in [0, 1] on the mask_logits' grid
    indices: list of B pairs (pred_idx, tgt_idx) of int64 tensors from HungarianMatcher
    context: dict; {"codec": the MaskCodec} for ISTR (the dice term decodes matched embeddings with it)
    num_boxes: float >= 1, the (distributed-averaged) number of target boxes; every term is a sum over
             matched pairs (or over all K x C logits for "focal") divided by it.

Terms compute in float32 (autocast disabled). With no matched pair in the batch they return a zero that is
still connected to the graph (0 * sum(predictions)), so every parameter gets a (zero) gradient.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from istr.matching.costs import box_scale, context_codec
from istr.registry import Registry

__all__ = ["LOSSES", "register_loss", "focal_loss", "l1_loss", "giou_loss", "embed_l2_loss",
           "embed_smooth_l1_loss", "dice_loss", "mask_dice_loss", "mask_bce_loss", "matched_predictions", "matched_targets",
           "dice_per_instance"]

# a loss term is registered with the output and target keys it reads (SetCriterion checks them up front)
LOSSES = Registry("loss term", defaults={"reads": (), "target_reads": ()})

LossFn = Callable[[dict, Sequence[dict], Sequence[tuple], object, float], torch.Tensor]


register_loss = LOSSES.register  # @register_loss(name, reads=, target_reads=): a term -> scalar (module docstring)


def _batch_index(indices: Sequence[tuple], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    src = torch.cat([src for src, _ in indices])
    return batch.to(device), src.to(device)


def matched_predictions(outputs: dict, key: str, indices: Sequence[tuple]) -> torch.Tensor:
    """outputs[key] [B, K, ...] at the matched queries, image by image -> [N, ...] float32 (N = matched pairs)."""
    values = outputs[key]
    batch, src = _batch_index(indices, values.device)
    return values[batch, src].float()


def matched_targets(targets: Sequence[dict], key: str, indices: Sequence[tuple]) -> torch.Tensor:
    """targets[b][key] at the matched targets, concatenated in the order of matched_predictions -> [N, ...]
    (dtype kept)."""
    return torch.cat([t[key][tgt.to(t[key].device)] for t, (_, tgt) in zip(targets, indices)])


def _zero(outputs: dict, key: str) -> torch.Tensor:
    """A graph-connected zero (0 * sum of the predictions) for batches without matched pairs."""
    return outputs[key].float().sum() * 0.0


def _num_matched(indices: Sequence[tuple]) -> int:
    return sum(len(src) for src, _ in indices)


@register_loss("focal", reads=("logits",), target_reads=("labels",))
def focal_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context, num_boxes: float,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (torchvision, alpha 0.25, gamma 2) over all B x K x C logits; one-hot targets for
    matched queries, all-zero for the rest; summed / num_boxes."""
    logits = outputs["logits"].float()
    onehot = torch.zeros_like(logits)
    if _num_matched(indices):
        batch, src = _batch_index(indices, logits.device)
        labels = matched_targets(targets, "labels", indices).to(logits.device)
        onehot[batch, src, labels] = 1.0
    return sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def _matched_boxes(outputs, targets, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = matched_predictions(outputs, "boxes", indices)
    tgt = matched_targets(targets, "boxes", indices).to(pred.device, torch.float32)
    scale = torch.cat([box_scale(t["image_size"], pred).expand(len(j), 4) for t, (_, j) in zip(targets, indices)])
    return pred, tgt, scale


@register_loss("l1", reads=("boxes",), target_reads=("boxes", "image_size"))
def l1_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context, num_boxes: float) -> torch.Tensor:
    """L1 between matched xyxy boxes divided by (W, H, W, H) of their image, summed over coords and pairs / num_boxes."""
    if not _num_matched(indices):
        return _zero(outputs, "boxes")
    pred, tgt, scale = _matched_boxes(outputs, targets, indices)
    return (pred / scale - tgt / scale).abs().sum() / num_boxes


@register_loss("giou", reads=("boxes",), target_reads=("boxes",))
def giou_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context, num_boxes: float) -> torch.Tensor:
    """1 - GIoU of each matched (pred, target) pair of absolute xyxy boxes, summed / num_boxes.

    torchvision.ops.generalized_box_iou_loss is the pairwise (diagonal) form of generalized_box_iou: O(N)
    instead of an N x N matrix, with eps 1e-7 in its divisions so degenerate boxes stay finite."""
    if not _num_matched(indices):
        return _zero(outputs, "boxes")
    pred, tgt, _ = _matched_boxes(outputs, targets, indices)
    return generalized_box_iou_loss(pred, tgt, reduction="sum") / num_boxes


def _matched_embeds(outputs, targets, indices) -> tuple[torch.Tensor, torch.Tensor]:
    pred = matched_predictions(outputs, "mask_embeds", indices)
    tgt = matched_targets(targets, "mask_embeds", indices).to(pred.device, torch.float32).detach()
    return pred, tgt


@register_loss("embed_l2", reads=("mask_embeds",), target_reads=("mask_grids",))
def embed_l2_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context,
                  num_boxes: float) -> torch.Tensor:
    """ISTR v1 / paper embedding loss: squared error summed over dims and pairs / num_boxes / l."""
    if not _num_matched(indices):
        return _zero(outputs, "mask_embeds")
    pred, tgt = _matched_embeds(outputs, targets, indices)
    return (pred - tgt).pow(2).sum() / num_boxes / pred.shape[-1]


@register_loss("embed_smooth_l1", reads=("mask_embeds",), target_reads=("mask_grids",))
def embed_smooth_l1_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context,
                         num_boxes: float) -> torch.Tensor:
    """ISTR v2 embedding loss: SmoothL1 (beta 1) summed over dims and pairs / num_boxes / l."""
    if not _num_matched(indices):
        return _zero(outputs, "mask_embeds")
    pred, tgt = _matched_embeds(outputs, targets, indices)
    return F.smooth_l1_loss(pred, tgt, beta=1.0, reduction="sum") / num_boxes / pred.shape[-1]


def dice_per_instance(masks: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """[N, M, M] predicted masks and binary targets -> [N] dice loss 1 - 2 sum(p t) / (sum p^2 + sum t^2 + 1e-5)."""
    p, t = masks.flatten(1), grids.flatten(1)
    return 1 - 2 * (p * t).sum(1) / (p.pow(2).sum(1) + t.pow(2).sum(1) + 1e-5)


@register_loss("dice", reads=("mask_embeds",), target_reads=("mask_grids",))
def dice_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context, num_boxes: float) -> torch.Tensor:
    """Dice loss between codec.decode(matched predicted embeddings) and the target grids binarised at >= 0.5,
    summed over matched pairs / num_boxes (at the codec's M x M)."""
    if not _num_matched(indices):
        return _zero(outputs, "mask_embeds")
    codec = context_codec(context, "dice")
    masks = codec.decode(matched_predictions(outputs, "mask_embeds", indices)).float()
    grids = (matched_targets(targets, "mask_grids", indices).to(masks.device) >= 0.5).float()
    return dice_per_instance(masks, grids).sum() / num_boxes


@register_loss("mask_dice", reads=("mask_logits",), target_reads=("masks",))
def mask_dice_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context,
                   num_boxes: float) -> torch.Tensor:
    """ISDA's dice loss on mask logits: 1 - 2 sum(p t) / (sum p^2 + 1e-3 + sum t^2 + 1e-3) with p =
    sigmoid(matched mask_logits) and t the matched GT masks on the same grid, summed over pairs / num_boxes."""
    if not _num_matched(indices):
        return _zero(outputs, "mask_logits")
    p = matched_predictions(outputs, "mask_logits", indices).sigmoid().flatten(1)
    t = matched_targets(targets, "masks", indices).to(p.device, torch.float32).flatten(1)
    dice = 1 - 2 * (p * t).sum(1) / (p.pow(2).sum(1) + 1e-3 + t.pow(2).sum(1) + 1e-3)
    return dice.sum() / num_boxes


@register_loss("mask_bce", reads=("mask_logits",), target_reads=("masks",))
def mask_bce_loss(outputs: dict, targets: Sequence[dict], indices: Sequence[tuple], context,
                  num_boxes: float) -> torch.Tensor:
    """Per-pixel sigmoid binary cross-entropy on mask logits (Mask2Former's mask loss beside dice; not in ISDA):
    the mean over each matched pair's pixels, summed over pairs / num_boxes. Dice alone weighs an object's pixels by
    its size; BCE sharpens every boundary pixel alike."""
    if not _num_matched(indices):
        return _zero(outputs, "mask_logits")
    logits = matched_predictions(outputs, "mask_logits", indices).float().flatten(1)
    t = matched_targets(targets, "masks", indices).to(logits.device, torch.float32).flatten(1)
    return F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(1).sum() / num_boxes
