"""Multi-level RoIAlign (detectron2 ROIAlignV2 = torchvision roi_align, aligned=True) as one embedding_bag.

Why not torchvision.ops.roi_align: on CPU its backward is single-threaded and recomputes the bilinear weights
for every channel; it was 30% of a CPU training step of the demo model. Here every output bin is a weighted
sum of (sampling_ratio^2 x 4 corners) rows of one channels-last table holding all pyramid levels, so the
forward is one `F.embedding_bag` call for all levels, and so is its backward (the same weights, grouped by
table row after one int32 sort; torch's own embedding_bag backward was 5x slower). Values equal torchvision's up
to float rounding (tests/test_ops.py). Like torchvision, no gradient flows to the boxes.

While torch.export / torch.onnx.export capture a graph (or under `roi_align_impl("export")`), multiscale_roi_align
takes an export path instead: the same sample positions and weights, one plain gather + weighted sum (an exporter
turns embedding_bag into a Loop per call, 3x slower in onnxruntime), with every size read from the feature maps'
shapes (no int(), so an exported graph keeps dynamic batch and image sizes).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from istr.ops.tracing import is_exporting

__all__ = ["PyramidTable", "fpn_levels", "multiscale_roi_align", "roi_align_impl"]

_IMPLS = ("auto", "embedding_bag", "export")
_default_impl = "auto"  # set by roi_align_impl()


@contextlib.contextmanager
def roi_align_impl(impl: str) -> Iterator[None]:
    """Within the block, multiscale_roi_align uses `impl`: "auto" (the export path while a graph is captured, else
    embedding_bag), "embedding_bag" or "export". Process-wide; nested blocks restore the outer choice on exit."""
    global _default_impl
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {_IMPLS}, got {impl!r}")
    previous, _default_impl = _default_impl, impl
    try:
        yield
    finally:
        _default_impl = previous


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
        self.features = list(features)  # the maps themselves, for the export path


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
    export = _default_impl == "export" or (_default_impl == "auto" and is_exporting())
    if export:
        maps = features.features if isinstance(features, PyramidTable) else list(features)
        tab_strides = features.strides if isinstance(features, PyramidTable) else tuple(strides)
        return _roi_align_export(maps, boxes, output_size, tab_strides, sampling_ratio, tokens)
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


def _roi_align_export(features: Sequence[torch.Tensor], boxes: torch.Tensor, output_size: int,
                      strides: Sequence[int], sampling_ratio: int, tokens: bool) -> torch.Tensor:
    """multiscale_roi_align's export path: the embedding_bag path's positions and weights (_axis), gathered from one
    channels-last table of all levels with index_select and summed; sizes and offsets come from the maps' shapes
    as tensors. Returns [B*K, C, S, S] (or [B*K, S*S, C] with tokens)."""
    if len(features) != len(strides):
        raise ValueError(f"got {len(features)} feature maps for {len(strides)} strides")
    c = features[0].shape[1]
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    rois = boxes.reshape(-1, 4).detach().to(dtype)
    broken = ~torch.isfinite(rois).all(1)
    rois = rois.masked_fill(broken[:, None], 0.0)
    dev, s, sr = rois.device, int(output_size), int(sampling_ratio)
    b, k = boxes.shape[0], boxes.shape[1]
    levels = (fpn_levels(rois, strides) if len(strides) > 1
              else torch.zeros_like(rois[:, 0], dtype=torch.long))
    # per level: height, width and first row in the table, as int64 tensors read from the shapes
    heights_l = torch.stack([torch.full((), f.shape[2], dtype=torch.long, device=dev) for f in features])
    widths_l = torch.stack([torch.full((), f.shape[3], dtype=torch.long, device=dev) for f in features])
    sizes_l = heights_l * widths_l * b
    offsets_l = torch.cumsum(sizes_l, 0) - sizes_l
    heights, widths = heights_l[levels], widths_l[levels]
    scale = 1.0 / torch.tensor(tuple(float(st) for st in strides), dtype=dtype, device=dev)[levels]
    start_x, start_y = rois[:, 0] * scale - 0.5, rois[:, 1] * scale - 0.5
    bin_w = (rois[:, 2] * scale - 0.5 - start_x) / s
    bin_h = (rois[:, 3] * scale - 0.5 - start_y) / s
    y0, y1, wy = _axis(start_y, bin_h, heights, s, sr)
    x0, x1, wx = _axis(start_x, bin_w, widths, s, sr)
    image = torch.arange(b, device=dev)[:, None].expand(b, k).reshape(-1)
    base = (offsets_l[levels] + image * heights * widths)[:, None, None]
    row = widths[:, None, None]
    index = torch.stack([base + y0[:, :, None] * row + x0[:, None, :], base + y0[:, :, None] * row + x1[:, None, :],
                         base + y1[:, :, None] * row + x0[:, None, :], base + y1[:, :, None] * row + x1[:, None, :]], -1)
    weight = torch.stack([wy[:, :, None, 0] * wx[:, None, :, 0], wy[:, :, None, 0] * wx[:, None, :, 1],
                          wy[:, :, None, 1] * wx[:, None, :, 0], wy[:, :, None, 1] * wx[:, None, :, 1]], -1)
    per_bin = sr * sr * 4
    bags = lambda t: t.reshape(-1, s, sr, s, sr, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1, per_bin)  # noqa: E731
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features])
    weight = bags(weight).to(table.dtype) / (sr * sr)
    weight = weight.masked_fill(broken[:, None].expand(-1, s * s).reshape(-1)[:, None], float("nan"))
    gathered = table.index_select(0, bags(index).reshape(-1)).view(-1, per_bin, c)  # [R*S*S, sr*sr*4, C]
    out = torch.bmm(weight[:, None, :], gathered).view(-1, s * s, c)
    return out if tokens else out.transpose(1, 2).reshape(-1, c, s, s)
