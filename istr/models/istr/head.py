"""One ISTR refinement stage: RoIAlign -> self-attention -> dynamic interaction -> FFN -> class/box/mask branches."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from istr.ops.activations import ELU, elu
from istr.ops.roi_align import PyramidTable, multiscale_roi_align

__all__ = ["ISTRStage", "DynamicInteraction", "RoICrossAttention", "multiscale_roi_align", "apply_box_deltas",
           "BOX_DELTA_WEIGHTS", "BOX_DELTA_CLAMP"]

BOX_DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
BOX_DELTA_CLAMP = math.log(100000.0 / 16)


def apply_box_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: Sequence[float] = BOX_DELTA_WEIGHTS,
                     clamp: float = BOX_DELTA_CLAMP) -> torch.Tensor:
    """Decode deltas [..., 4] (tx, ty, tw, th) relative to boxes [..., 4] absolute xyxy -> xyxy, no clipping.

    (torchvision's BoxCoder lives in a private module, so the few lines are written here.)
    """
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw, dh = (deltas[..., 2] / ww).clamp(max=clamp), (deltas[..., 3] / wh).clamp(max=clamp)
    pcx, pcy = cx + dx * widths, cy + dy * heights
    pw, ph = widths * torch.exp(dw), heights * torch.exp(dh)
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)


def _mlp_branch(dim: int, out_dim: int, depth: int = 3) -> nn.Sequential:
    """depth x [Linear(dim, dim, bias=False), LayerNorm, ELU] then Linear(dim, out_dim)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), ELU()]
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class DynamicInteraction(nn.Module):
    """Sparse R-CNN DynamicConv ("dynamic attention" in ISTR): per-query 1x1 convs generated from the query.

    forward(queries [N, d], roi_tokens [N, S*S, d]) -> [N, d].
    """

    def __init__(self, dim: int = 256, dynamic_dim: int = 64, roi_size: int = 7) -> None:
        super().__init__()
        self.dim, self.dynamic_dim = dim, dynamic_dim
        self.generator = nn.Linear(dim, 2 * dim * dynamic_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dynamic_dim), nn.LayerNorm(dim)
        self.out = nn.Linear(roi_size * roi_size * dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, roi_tokens: torch.Tensor) -> torch.Tensor:
        # split, not two slices: each slice's backward zero-fills a full [N, 2*d*dd] gradient; split's is one cat
        w1, w2 = self.generator(queries).split(self.dim * self.dynamic_dim, dim=1)  # [N, d*dd] each
        w1, w2 = w1.view(-1, self.dim, self.dynamic_dim), w2.view(-1, self.dynamic_dim, self.dim)
        x = elu(self.norm1(torch.bmm(roi_tokens, w1)))  # [N, S*S, dd]
        x = elu(self.norm2(torch.bmm(x, w2)))  # [N, S*S, d]
        return elu(self.norm3(self.out(x.flatten(1))))  # flatten spatial-major: index = s*d + c


class RoICrossAttention(nn.Module):
    """Table 1d ablation: the query attends over its RoI tokens with multi-head attention.

    forward(queries [N, d], roi_tokens [N, S*S, d]) -> [N, d].
    """

    def __init__(self, dim: int = 256, num_heads: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)

    def forward(self, queries: torch.Tensor, roi_tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(queries[:, None], roi_tokens, roi_tokens, need_weights=False)
        return out[:, 0]


class RoIConvMaskHead(nn.Module):
    """ISTR v2 mask head: RoI features [N, C, R, R] -> 2 x [conv k4 s2 p1, BN, ELU] -> conv k(R/4) valid -> [N, out].

    ISTR v2 hard-wires out = C = 256; here out is the codec's dim and the conv width defaults to C.
    """

    def __init__(self, in_channels: int, out_dim: int, roi_size: int = 28, channels: int | None = None) -> None:
        super().__init__()
        if roi_size % 4:
            raise ValueError(f"mask_roi_size must be a multiple of 4 (two stride-2 convs), got {roi_size}")
        channels = channels or in_channels
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, 2, 1), nn.BatchNorm2d(channels), ELU(),
            nn.Conv2d(channels, channels, 4, 2, 1), nn.BatchNorm2d(channels), ELU(),
            nn.Conv2d(channels, out_dim, roi_size // 4))

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.convs(roi_features).flatten(1)


class ISTRStage(nn.Module):
    """One refinement stage (reference sec. 1.4-1.6). Dropout is 0 everywhere; all norms are post-norm.

    forward(features, boxes [B, K, 4], queries [B, K, d], attn_mask=None) -> (queries [B, K, d], logits [B, K, C],
    boxes [B, K, 4] absolute xyxy). `mask_embeds(queries, boxes, features)` -> [B, n, l] for any n queries
    (so inference can run the mask branch on the kept detections only).
    """

    def __init__(self, num_classes: int, mask_dim: int, *, hidden_dim: int = 256, dynamic_dim: int = 64,
                 ffn_dim: int = 2048, num_heads: int = 8, roi_size: int = 7, attention: str = "dynamic",
                 mask_head: str = "query_mlp", mask_roi_size: int = 28, strides: Sequence[int] = (4, 8, 16, 32),
                 prior_prob: float = 0.01) -> None:
        super().__init__()
        if attention not in ("dynamic", "multihead"):
            raise ValueError(f"attention must be 'dynamic' or 'multihead', got {attention!r}")
        if mask_head not in ("query_mlp", "roi_conv"):
            raise ValueError(f"mask_head must be 'query_mlp' or 'roi_conv', got {mask_head!r}")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.roi_size, self.mask_roi_size, self.strides = roi_size, mask_roi_size, tuple(strides)
        self.mask_head_kind, self.prior_prob = mask_head, prior_prob
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.interaction = (DynamicInteraction(hidden_dim, dynamic_dim, roi_size) if attention == "dynamic"
                            else RoICrossAttention(hidden_dim, num_heads))
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(nn.Linear(hidden_dim, ffn_dim), ELU(), nn.Linear(ffn_dim, hidden_dim))
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.class_branch = _mlp_branch(hidden_dim, num_classes)
        self.box_branch = _mlp_branch(hidden_dim, 4)
        if mask_head == "query_mlp":
            self.mask_branch: nn.Module = _mlp_branch(hidden_dim, mask_dim)
        else:
            self.mask_branch = RoIConvMaskHead(hidden_dim, mask_dim, mask_roi_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform for every parameter with >= 2 dims; class bias = -log((1 - p) / p)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_branch[-1].bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    def forward(self, features: Sequence[torch.Tensor] | PyramidTable, boxes: torch.Tensor, queries: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features: the pyramid maps (or a PyramidTable of them, built once for all stages); attn_mask: optional
        bool [K, K] for the self-attention, True = query i may not attend to key j."""
        b, k, d = queries.shape
        # [B*K, S*S, d], token = spatial index
        roi_tokens = multiscale_roi_align(features, boxes, self.roi_size, self.strides, tokens=True)
        attended = self.self_attn(queries, queries, queries, attn_mask=attn_mask, need_weights=False)[0]
        queries = self.norm1(queries + attended)
        flat = queries.reshape(b * k, d)
        flat = self.norm2(flat + self.interaction(flat, roi_tokens))
        flat = self.norm3(flat + self.ffn(flat))
        queries = flat.view(b, k, d)
        logits = self.class_branch(queries)
        new_boxes = apply_box_deltas(self.box_branch(queries), boxes)
        return queries, logits, new_boxes

    def mask_embeds(self, queries: torch.Tensor, boxes: torch.Tensor,
                    features: Sequence[torch.Tensor] | PyramidTable) -> torch.Tensor:
        """queries [B, n, d], this stage's new boxes [B, n, 4] -> mask embeddings [B, n, l]."""
        if self.mask_head_kind == "query_mlp":
            return self.mask_branch(queries)
        b, n = boxes.shape[:2]
        rois = multiscale_roi_align(features, boxes, self.mask_roi_size, self.strides)
        return self.mask_branch(rois).view(b, n, -1)
