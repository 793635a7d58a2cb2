"""Matching cost terms: a registry of functions (one image's predictions, its targets, context) -> cost [K, T].

Call contract of every cost term (look terms up with COSTS.get(name) or list them with COSTS.list()):

    term(pred, tgt, context) -> cost: float32 Tensor [K, T]   (lower = better match)

    pred: predictions of ONE image, the keys the term reads, e.g.
        "logits":      [K, C] class logits (sigmoid / focal convention, no background class)
        "boxes":       [K, 4] absolute xyxy in the (resized, unpadded) input image            (ISTR)
        "mask_embeds": [K, l] predicted mask embeddings                                          (ISTR)
        "mask_logits": [K, h, w] mask logits over the padded input at the mask stride            (ISDA)
    tgt: targets of ONE image (istr.losses.targets prepares them), e.g.
        "labels":      int64 [T] in [0, C)
        "boxes":       [T, 4] absolute xyxy, same frame as pred["boxes"]
        "image_size":  [2] (h, w) of the resized, unpadded image
        "mask_grids":  [T, M, M] box-cropped GT masks in [0, 1]                                  (ISTR)
        "mask_embeds": [T, l] codec.encode(mask_grids) (optional: encoded here when absent)      (ISTR)
        "masks":       [T, h, w] GT masks in [0, 1] resampled to pred["mask_logits"]' grid       (ISDA)
    context: a dict of what a term may need besides the tensors: {"codec": the MaskCodec} for embedding terms
        (ISTR), {} for terms on mask logits (ISDA). `as_context` turns None or a bare codec into one.

Batched form: a term registered with batched=True (all built-in terms) also accepts a leading batch dim,
pred values [B, K, ...], tgt values padded to [B, T_max, ...] and tgt["image_size"] [B, 2], and returns
[B, K, T_max]; entry [b] must equal the one-image result on image b (padded columns are discarded by the
matcher). Terms registered with batched=False are only ever called one image at a time.

Terms are called by HungarianMatcher under torch.no_grad with autocast disabled; they upcast to float32.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torchvision.ops import generalized_box_iou

from istr.codecs.base import MaskCodec
from istr.registry import Registry

__all__ = ["COSTS", "register_cost", "focal_cost", "l1_cost", "giou_cost", "cosine_cost", "embed_l1_cost",
           "dice_cost", "mask_iou_cost", "box_scale", "target_embeds", "with_target_embeds", "as_context", "context_codec"]

# a cost term is registered with the prediction and target keys it reads (SetCriterion checks them up front) and
# batched=True when it also handles a leading batch dim (see the module docstring; the matcher then calls it once)
COSTS = Registry("cost term", defaults={"batched": False, "reads": (), "target_reads": ()})

CostFn = Callable[[dict, dict, dict], torch.Tensor]


def as_context(context: Any) -> dict[str, Any]:
    """The term context as a dict: None -> {}, a MaskCodec -> {"codec": codec}, a mapping -> a dict copy."""
    if context is None:
        return {}
    if isinstance(context, Mapping):
        return dict(context)
    if isinstance(context, MaskCodec):
        return {"codec": context}
    raise TypeError(f"context must be a dict (e.g. {{'codec': codec}}), a MaskCodec or None, got {type(context).__name__}")


def context_codec(context: Mapping[str, Any] | MaskCodec | None, term: str) -> MaskCodec:
    """context["codec"] (or the context itself when it is a bare codec), or a ValueError naming the term."""
    codec = context if isinstance(context, MaskCodec) else (context or {}).get("codec")
    if codec is None:
        raise ValueError(f"the {term!r} term needs a codec: pass context={{'codec': codec}} (ISTR models do)")
    return codec


register_cost = COSTS.register  # @register_cost(name, batched=, reads=, target_reads=): a term (pred, tgt, context) -> [K, T]


def box_scale(image_size: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(h, w) [..., 2] -> (w, h, w, h) [..., 4] on like's device / dtype, to normalise xyxy boxes."""
    h, w = torch.as_tensor(image_size, dtype=like.dtype, device=like.device).unbind(-1)
    return torch.stack([w, h, w, h], -1)


def target_embeds(tgt: dict, context: Mapping[str, Any]) -> torch.Tensor:
    """The target's mask embeddings [..., T, l]: tgt["mask_embeds"] (with_target_embeds adds them in training),
    else codec.encode(mask_grids) for a matcher called on raw targets."""
    if "mask_embeds" in tgt:
        return tgt["mask_embeds"].float()
    codec = context_codec(context, "mask embedding cost")
    grids = tgt["mask_grids"]
    return codec.encode(grids.flatten(0, -3)).unflatten(0, grids.shape[:-2]).float()


@torch.no_grad()
def with_target_embeds(targets: list[dict], codec: MaskCodec | None) -> list[dict]:
    """Shallow copies of the targets with "mask_embeds" = codec.encode(mask_grids), one encode for the batch, when
    a codec is given and the targets carry grids without embeddings; else shallow copies as they are. The one place
    where target embeddings are computed for training (SetCriterion calls it once per forward)."""
    if codec is None or all("mask_embeds" in t for t in targets) or not all("mask_grids" in t for t in targets):
        return [dict(t) for t in targets]
    embeds = codec.encode(torch.cat([t["mask_grids"] for t in targets]))
    embeds = embeds.split([len(t["mask_grids"]) for t in targets])
    return [{**t, "mask_embeds": e} for t, e in zip(targets, embeds)]


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


@register_cost("focal", batched=True, reads=("logits",), target_reads=("labels",))
def focal_cost(pred: dict, tgt: dict, context=None, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal-style class cost (ISTR / Deformable DETR) on the GT-class probability p = sigmoid(logit):
    alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8)).  [K, T].

    Only the T target-class logit columns are gathered before any arithmetic (not all K x C).
    """
    logits, labels = pred["logits"], tgt["labels"]
    index = labels.unsqueeze(-2).expand(*logits.shape[:-1], labels.shape[-1])  # [..., K, T]
    p = logits.gather(-1, index).float().sigmoid_()
    q = 1 - p
    pos = (p + 1e-8).log_().mul_(-alpha).mul_(q.pow(gamma))  # alpha (1-p)^g (-log(p + eps))
    neg = (q + 1e-8).log_().mul_(alpha - 1).mul_(p.pow_(gamma))  # (1-alpha) p^g (-log(1-p + eps))
    return pos.sub_(neg)


@register_cost("l1", batched=True, reads=("boxes",), target_reads=("boxes", "image_size"))
def l1_cost(pred: dict, tgt: dict, context=None) -> torch.Tensor:
    """L1 distance between xyxy boxes divided by (W, H, W, H) of the image, summed over the 4 coords. [K, T]."""
    pred_boxes, tgt_boxes = pred["boxes"].float(), tgt["boxes"].float()
    scale = box_scale(tgt["image_size"], pred_boxes).unsqueeze(-2)  # [..., 1, 4]
    return torch.cdist(pred_boxes / scale, tgt_boxes / scale, p=1)


@register_cost("giou", batched=True, reads=("boxes",), target_reads=("boxes",))
def giou_cost(pred: dict, tgt: dict, context=None) -> torch.Tensor:
    """-GIoU between absolute xyxy boxes (torchvision.ops.generalized_box_iou). [K, T]."""
    return -generalized_box_iou(pred["boxes"].float(), tgt["boxes"].float())


@register_cost("cosine", batched=True, reads=("mask_embeds",), target_reads=("mask_grids",))
def cosine_cost(pred: dict, tgt: dict, context=None) -> torch.Tensor:
    """Paper Eq. 7: -(cos(r_hat, g(m)) + 1) / 2 with both embeddings L2-normalised; in [-1, 0]. [K, T]."""
    pred_embeds, tgt_embeds = pred["mask_embeds"].float(), target_embeds(tgt, context)
    # = F.normalize(pred) @ F.normalize(tgt).T (norms clamped at 1e-12 alike), without rescaling the [K, l] inputs
    pred_norm = pred_embeds.norm(dim=-1).clamp_min_(1e-12).unsqueeze(-1)  # [..., K, 1]
    tgt_norm = tgt_embeds.norm(dim=-1).clamp_min_(1e-12).unsqueeze(-2)  # [..., 1, T]
    cos = (pred_embeds @ _transpose(tgt_embeds)).div_(pred_norm).div_(tgt_norm)
    return cos.add_(1.0).mul_(-0.5)


@register_cost("embed_l1", batched=True, reads=("mask_embeds",), target_reads=("mask_grids",))
def embed_l1_cost(pred: dict, tgt: dict, context=None) -> torch.Tensor:
    """Mean absolute difference between predicted and target embeddings (L1 / l). [K, T]."""
    pred_embeds = pred["mask_embeds"].float()
    return torch.cdist(pred_embeds, target_embeds(tgt, context), p=1) / pred_embeds.shape[-1]


@register_cost("dice", batched=True, reads=("mask_embeds",), target_reads=("mask_grids",))
def dice_cost(pred: dict, tgt: dict, context) -> torch.Tensor:
    """1 - dice between decoded predicted masks and binarised (>= 0.5) target grids. [K, T].

    dice = 2 sum(p t) / (sum(p^2) + sum(t^2) + 1e-5) at M x M, as the dice loss; the K predictions are
    decoded once and compared with all T targets by one matrix product.
    """
    codec = context_codec(context, "dice")
    embeds = pred["mask_embeds"].float()
    masks = codec.decode(embeds.flatten(0, -2)).flatten(1).unflatten(0, embeds.shape[:-1]).float()  # [..., K, M*M]
    grids = (tgt["mask_grids"].flatten(-2) >= 0.5).float()  # [..., T, M*M]
    numerator = 2 * masks @ _transpose(grids)
    denominator = masks.pow(2).sum(-1).unsqueeze(-1) + grids.sum(-1).unsqueeze(-2) + 1e-5
    return 1 - numerator / denominator


@register_cost("mask_iou", batched=True, reads=("mask_logits",), target_reads=("masks",))
def mask_iou_cost(pred: dict, tgt: dict, context=None) -> torch.Tensor:
    """1 - soft IoU between sigmoid(pred["mask_logits"]) p and the GT masks g on the same grid (ISDA's MaskIoUCost):
    IoU = sum(p g) / (sum p + sum g - sum(p g)). [K, T]."""
    p = pred["mask_logits"].float().sigmoid().flatten(-2)  # [..., K, h*w]
    g = tgt["masks"].float().flatten(-2)  # [..., T, h*w]
    inter = p @ _transpose(g)
    union = p.sum(-1).unsqueeze(-1) + g.sum(-1).unsqueeze(-2) - inter
    return 1 - inter / union.clamp_min(1e-6)
