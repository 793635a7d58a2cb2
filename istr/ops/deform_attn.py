"""Multi-scale deformable attention (Deformable DETR's MSDA core) in pure PyTorch through F.grid_sample."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn", "spatial_shapes_list"]

SpatialShapes = Union[Sequence[Sequence[int]], torch.Tensor]


def spatial_shapes_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """[(H_l, W_l), ...] from a list of pairs or an int64 tensor [L, 2] (a tensor on an accelerator syncs once)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes: expected an integer tensor [L, 2], "
                             f"got shape {tuple(spatial_shapes.shape)}")
        if spatial_shapes.is_floating_point():
            raise TypeError(f"spatial_shapes: expected an integer tensor, got dtype {spatial_shapes.dtype}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = []
    for shape in spatial_shapes:
        if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"spatial_shapes: expected pairs of positive ints (H_l, W_l), got {list(spatial_shapes)}")
        shapes.append((int(shape[0]), int(shape[1])))
    if not shapes:
        raise ValueError("spatial_shapes: expected at least one level, got none")
    return shapes


def _check_inputs(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                  attention_weights: torch.Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value: expected [N, S, M, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations: expected [N, Lq, M, L, P, 2], "
                         f"got shape {tuple(sampling_locations.shape)}")
    n, s, m, _ = value.shape
    n_loc, lq, m_loc, l_loc, p, _ = sampling_locations.shape
    levels = len(shapes)
    total = sum(h * w for h, w in shapes)
    if s != total:
        raise ValueError(f"value: expected S = sum(H_l * W_l) = {total} for spatial_shapes {shapes}, got S = {s}")
    if (n_loc, m_loc, l_loc) != (n, m, levels):
        raise ValueError(f"sampling_locations: expected [N={n}, Lq, M={m}, L={levels}, P, 2] to match value "
                         f"and spatial_shapes, got shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != (n, lq, m, levels, p):
        raise ValueError(f"attention_weights: expected [N, Lq, M, L, P] = {(n, lq, m, levels, p)}, "
                         f"got shape {tuple(attention_weights.shape)}")


def ms_deform_attn(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Attention-weighted sum of bilinear samples of a flattened multi-level value map.

    value: [N, S, M, D], the L levels flattened row-major (y, x) and concatenated, S = sum(H_l * W_l);
    spatial_shapes: [(H_l, W_l)] * L, or an int64 tensor [L, 2];
    sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y), 0 and 1 being the outer edges of the map
    (samples at x * W_l - 0.5 in pixel-centre coordinates; outside the map reads zero, as the CUDA kernel does);
    attention_weights: [N, Lq, M, L, P] (softmax-normalised by the caller, not checked).
    Returns [N, Lq, M * D] (heads concatenated). Differentiable w.r.t. all three tensors.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    lq, p = sampling_locations.shape[1], sampling_locations.shape[4]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # [N*M, Lq, L, P, 2] in [-1, 1]
    weights = attention_weights.transpose(1, 2).flatten(0, 1)  # [N*M, Lq, L, P]
    out = value.new_zeros(n * m, d, lq)
    for level, (h, w) in enumerate(shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        sampled = F.grid_sample(value_l, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [N*M, D, Lq, P]
        # one level at a time: never holds the [N*M, D, Lq, L*P] stack the reference code builds
        out = out + torch.einsum("bdqp,bqp->bdq", sampled, weights[:, :, level])
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
