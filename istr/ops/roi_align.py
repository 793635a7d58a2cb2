"""Multi-level RoIAlign (detectron2 ROIAlignV2 = torchvision roi_align, aligned=True) as one embedding_bag.

Why not torchvision.ops.roi_align: on CPU its backward is single-threaded and recomputes the bilinear weights
for every channel; it was 30% of a CPU training step of the demo model. Here every output bin is a weighted
sum of (sampling_ratio^2 x 4 corners) rows of one channels-last table holding all pyramid levels, so the
forward is one `F.embedding_bag` call for all levels, and so is its backward (the same weights, grouped by
table row after one int32 sort; torch's own embedding_bag backward was 5x slower). Values equal torchvision's up
to float rounding (tests/test_ops.py). Like torchvision, no gradient flows to the boxes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PyramidTable", "fpn_levels", "multiscale_roi_align"]


class PyramidTable:
    """Feature maps [B, C, H_l, W_l] (one per stride) as one channels-last table [sum_l B*H_l*W_l, C].

    Build it once per forward and pass it to every multiscale_roi_align call that samples the same maps.
    """

    def __init__(self, features: Sequence[torch.Tensor], strides: Sequence[int]) -> None:
        if len(features) != len(strides):
            raise ValueError(f"got {len(features)} feature maps for {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)
        self.batch, self.channels = int(features[0].shape[0]), int(features[0].shape[1])
        self.heights = [int(f.shape[2]) for f in features]
        self.widths = [int(f.shape[3]) for f in features]
        offsets, total = [], 0
        for h, w in zip(self.heights, self.widths):
            offsets.append(total)
            total += self.batch * h * w
        self.offsets = offsets
        self.table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, self.channels) for f in features])


class _WeightedGather(torch.autograd.Function):
    """out[m] = sum_j weight[m, j] * table[index[m, j]]: [M, C] from table [N, C], index/weight [M, P]."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, weight = ctx.saved_tensors
        flat = index.flatten()
        order = torch.sort(flat.int(), stable=True).indices  # group the (output row, weight) pairs by table row
        counts = torch.bincount(flat, minlength=ctx.rows)
        offsets = torch.cumsum(counts, 0) - counts
        source = torch.div(order, index.shape[1], rounding_mode="floor")
        grad_table = F.embedding_bag(source, grad.contiguous(), offsets=offsets,
                                     per_sample_weights=weight.flatten()[order].to(grad.dtype), mode="sum")
        return grad_table, None, None


def fpn_levels(boxes: torch.Tensor, strides: Sequence[int]) -> torch.Tensor:
    """Index into `strides` of each box's FPN level (canonical 224 px at stride 16, level = floor(4 +
    log2(sqrt(area) / 224)), clamped to the available levels). boxes: [N, 4] absolute xyxy -> int64 [N]."""
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp_min(0)
    lo, hi = math.log2(strides[0]), math.log2(strides[-1])
    return (torch.floor(4 + torch.log2(area.sqrt() / 224 + 1e-8)).clamp(lo, hi) - lo).long()


def _axis(start: torch.Tensor, bin_size: torch.Tensor, size: torch.Tensor, output_size: int, sampling_ratio: int):
    """Sample positions along one axis, [R, S*sr], with torchvision's bilinear rules: a sample more than one
    pixel outside the map reads 0; positions in (-1, 0] read row 0; at or past the last row they read the last."""
    dev, dtype = start.device, start.dtype
    bins = torch.arange(output_size, device=dev).repeat_interleave(sampling_ratio).to(dtype)
    inner = torch.arange(sampling_ratio, device=dev).repeat(output_size).to(dtype) + 0.5
    # the same expression order as torchvision's kernel: start + p * bin + (i + .5) * bin / sr
    pos = start[:, None] + bins[None] * bin_size[:, None] + inner[None] * bin_size[:, None] / sampling_ratio
    last = (size - 1)[:, None].to(dtype)
    valid = (pos >= -1.0) & (pos <= size[:, None].to(dtype))
    pos = pos.clamp(min=0.0)
    low = torch.minimum(pos.floor(), last)
    pos = torch.minimum(pos, last)
    high = torch.minimum(low + 1, last)
    frac = pos - low
    weights = torch.stack([1 - frac, frac], -1) * valid[..., None]  # [R, S*sr, 2]
    return low.long(), high.long(), weights


def multiscale_roi_align(features: Sequence[torch.Tensor] | PyramidTable, boxes: torch.Tensor, output_size: int,
                         strides: Sequence[int] = (4, 8, 16, 32), sampling_ratio: int = 2,
                         tokens: bool = False) -> torch.Tensor:
    """RoIAlign each box on the one pyramid level its size selects (fpn_levels), aligned=True.

    features: maps [B, C, H/s, W/s] for s in strides, or a PyramidTable of them; boxes: [B, K, 4] absolute xyxy
    of the padded input. Returns [B*K, C, S, S], or with tokens=True [B*K, S*S, C] (token = spatial index,
    row-major), the layout computed natively.
    """
    table = features if isinstance(features, PyramidTable) else PyramidTable(features, strides)
    b, k = boxes.shape[:2]
    if b != table.batch:
        raise ValueError(f"boxes are for {b} images but the feature maps hold {table.batch}")
    dtype = torch.promote_types(table.table.dtype, torch.float32)  # coordinates at least in float32
    rois = boxes.reshape(-1, 4).detach().to(dtype)
    # a box with NaN/inf (a diverged model) samples nowhere and yields NaN features, without a device sync
    broken = ~torch.isfinite(rois).all(1)
    rois = rois.masked_fill(broken[:, None], 0.0)
    dev, r, s, sr = rois.device, rois.shape[0], int(output_size), int(sampling_ratio)
    levels = fpn_levels(rois, table.strides) if len(table.strides) > 1 else torch.zeros(r, dtype=torch.long, device=dev)
    heights = torch.tensor(table.heights, device=dev)[levels]
    widths = torch.tensor(table.widths, device=dev)[levels]
    scale = 1.0 / torch.tensor(table.strides, dtype=dtype, device=dev)[levels]
    start_x, start_y = rois[:, 0] * scale - 0.5, rois[:, 1] * scale - 0.5
    bin_w = (rois[:, 2] * scale - 0.5 - start_x) / s
    bin_h = (rois[:, 3] * scale - 0.5 - start_y) / s
    y0, y1, wy = _axis(start_y, bin_h, heights, s, sr)
    x0, x1, wx = _axis(start_x, bin_w, widths, s, sr)
    image = torch.arange(b, device=dev).repeat_interleave(k)
    base = (torch.tensor(table.offsets, device=dev)[levels] + image * heights * widths)[:, None, None]
    row = widths[:, None, None]
    index = torch.stack([base + y0[:, :, None] * row + x0[:, None, :], base + y0[:, :, None] * row + x1[:, None, :],
                         base + y1[:, :, None] * row + x0[:, None, :], base + y1[:, :, None] * row + x1[:, None, :]], -1)
    weight = torch.stack([wy[:, :, None, 0] * wx[:, None, :, 0], wy[:, :, None, 0] * wx[:, None, :, 1],
                          wy[:, :, None, 1] * wx[:, None, :, 0], wy[:, :, None, 1] * wx[:, None, :, 1]], -1)
    # [R, S*sr, S*sr, 4] -> one bag per output bin: [R*S*S, sr*sr*4], averaged over the sr x sr samples
    bags = lambda t: t.view(r, s, sr, s, sr, 4).permute(0, 1, 3, 2, 4, 5).reshape(r * s * s, sr * sr * 4)  # noqa: E731
    weight = bags(weight).to(table.table.dtype) / (sr * sr)
    weight = weight.masked_fill(broken.repeat_interleave(s * s)[:, None], float("nan"))  # NaN out for broken boxes
    out = _WeightedGather.apply(table.table, bags(index), weight).view(r, s * s, table.channels)
    return out if tokens else out.transpose(1, 2).reshape(r, table.channels, s, s)
