"""Deformable DETR transformer (single stage, no box refinement) as ISDA uses it: MSDA, sine positions, layers."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from istr.ops.deform_attn import (GatherSlices, SpatialShapes, check_padding_mask, ms_deform_attn,
                                  ms_deform_attn_projected, projecting_later_is_cheaper, resolve_impl,
                                  spatial_shapes_list)
from istr.ops.tracing import is_exporting

__all__ = ["DeformableDecoderLayer", "DeformableEncoderLayer", "DeformableTransformer",
           "MultiScaleDeformableAttention", "encoder_reference_points", "level_masks", "sine_position_encoding",
           "valid_ratios"]


class MultiScaleDeformableAttention(nn.Module):
    """MSDA (Deformable DETR): each query attends to num_points sampled points per head and level around its
    reference point; offsets and weights are linear in the query, weights softmax-normalised over levels x points.
    """

    def __init__(self, hidden_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim must be divisible by num_heads, got hidden_dim={hidden_dim}, num_heads={num_heads}")
        self.hidden_dim, self.num_levels, self.num_heads, self.num_points = hidden_dim, num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(hidden_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(hidden_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(hidden_dim, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head m's points on a ray at angle 2*pi*m/M (the larger of |cos|, |sin| scaled
        to 1), point i at distance i+1 px, same at every level; uniform attention; xavier projections."""
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # [M, 2]
        scale = torch.arange(1, p + 1, dtype=torch.float64)
        bias = direction[:, None, None, :] * scale[None, None, :, None]  # [M, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(m, lv, p, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sample_points(self, query: torch.Tensor, reference_points: torch.Tensor,
                      spatial_shapes: SpatialShapes) -> tuple[torch.Tensor, torch.Tensor]:
        """Where and how much each query looks: query [N, Lq, C], reference_points [N, Lq, L, 2] normalised (x, y).

        Returns sampling_locations [N, Lq, M, L, P, 2] normalised (x, y) = ref + offset / (W_l, H_l) and
        attention_weights [N, Lq, M, L, P] (sum to 1 over L, P for each head).
        """
        shapes = spatial_shapes_list(spatial_shapes)
        n, lq, _ = query.shape
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        if reference_points.shape != (n, lq, lv, 2):
            raise ValueError(f"reference_points: expected [N, Lq, L, 2] = {(n, lq, lv, 2)}, "
                             f"got shape {tuple(reference_points.shape)}")
        offsets = self.sampling_offsets(query)  # [N, Lq, M * L * P * 2]
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
        # the small operands are written out along the axes they broadcast over, so that every op runs a contiguous
        # inner loop of 32-256 values instead of 2 (3-5x faster; the same values): (W_l, H_l) over (M, L, P, 2), the
        # reference points over (L, P, 2) (without autograd only: their gradient would then be summed in another order)
        normalizer = normalizer[:, None].expand(m, lv, p, 2).reshape(-1)
        grad = torch.is_grad_enabled()
        offsets = offsets / normalizer if grad else offsets.div_(normalizer)  # inference: in place, the linear's own
        if grad and reference_points.requires_grad:
            locations = reference_points[:, :, None, :, None, :] + offsets.view(n, lq, m, lv, p, 2)
        else:
            ref = reference_points[:, :, None, :, None, :].expand(n, lq, 1, lv, p, 2).reshape(n, lq, 1, lv * p * 2)
            offsets = offsets.view(n, lq, m, lv * p * 2)
            locations = (offsets + ref if grad else offsets.add_(ref)).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p).softmax(-1).view(n, lq, m, lv, p)
        return locations, weights

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_input: torch.Tensor,
                spatial_shapes: SpatialShapes, level_start_index: Optional[Union[Sequence[int], torch.Tensor]] = None,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [N, Lq, C] (positions already added), reference_points [N, Lq, L, 2] normalised (x, y) per level,
        value_input [N, S, C] flattened levels, spatial_shapes [(H_l, W_l)] * L or int64 [L, 2],
        level_start_index [L] (optional; the levels are split by spatial_shapes), padding_mask [N, S] bool
        (True = padding; those values are zeroed) or None. Returns [N, Lq, C].
        """
        shapes = spatial_shapes_list(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes: expected {self.num_levels} levels, got {len(shapes)}: {shapes}")
        if query.dim() != 3 or query.shape[-1] != self.hidden_dim:
            raise ValueError(f"query: expected [N, Lq, {self.hidden_dim}], got shape {tuple(query.shape)}")
        n, s = query.shape[0], sum(h * w for h, w in shapes)
        if value_input.shape != (n, s, self.hidden_dim):
            raise ValueError(f"value_input: expected [N, S, C] = {(n, s, self.hidden_dim)} for spatial_shapes {shapes}, "
                             f"got shape {tuple(value_input.shape)}")
        if level_start_index is not None:
            starts = [0, *itertools.accumulate(h * w for h, w in shapes[:-1])]
            given = (level_start_index.tolist() if isinstance(level_start_index, torch.Tensor)
                     else list(level_start_index))
            if given != starts:
                raise ValueError(f"level_start_index: expected {starts} for spatial_shapes {shapes}, got {given}")
        locations, weights = self.sample_points(query, reference_points, shapes)
        if self._project_later(query, s):
            proj = self.value_proj
            return self.output_proj(ms_deform_attn_projected(value_input, shapes, locations, weights, proj.weight,
                                                             proj.bias, padding_mask))
        value = self.project_value(value_input, padding_mask)
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))

    def _project_later(self, query: torch.Tensor, tokens: int) -> bool:
        """Inference on the gather formulation with few queries (a decoder's cross-attention): the samples are summed
        before the value projection (ms_deform_attn_projected; the same values to float rounding) instead of projecting
        every token of the map. An 800x1216 isda_r50's six decoder layers: 268 -> 97 ms on one CPU thread, 161 -> 74
        ms on two (AMD EPYC, benchmarks/README.md)."""
        m, head_dim = self.num_heads, self.hidden_dim // self.num_heads
        return (not torch.is_grad_enabled() and resolve_impl(query.device) == "gather"
                and projecting_later_is_cheaper(tokens, query.shape[1], m, self.num_levels, self.num_points, head_dim))

    def project_value(self, value_input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """value_input [N, S, C] -> the values [N, S, M, C / M] the heads sample, padding (True in padding_mask
        [N, S] bool) zeroed."""
        n, s, _ = value_input.shape
        value = self.value_proj(value_input)
        check_padding_mask(padding_mask, n, s)
        if padding_mask is not None:
            if torch.is_grad_enabled() and value.requires_grad:
                value = value.masked_fill(padding_mask[..., None], 0.0)
            else:  # inference: in place, without a copy of [N, S, C]
                value.masked_fill_(padding_mask[..., None], 0.0)
        return value.view(n, s, self.num_heads, self.hidden_dim // self.num_heads)


def sine_position_encoding(mask: Union[torch.Tensor, Sequence[int]], num_feats: int = 128, temperature: float = 10000,
                           normalize: bool = True, scale: float = 2 * math.pi, offset: float = -0.5,
                           eps: float = 1e-6, dtype: torch.dtype = torch.float32,
                           device: Optional[torch.device] = None) -> torch.Tensor:
    """DETR/mmdet sine positions: mask [N, H, W] bool (True = padding), or a shape (N, H, W) for no padding.

    Coordinates are the cumulative count of valid pixels (1..h along y), with normalize
    (count + offset) / (count at the last row/column + eps) * scale. Returns [N, 2 * num_feats, H, W]:
    y features first, then x, each interleaving sin and cos of coordinate / temperature ** (2 * (k // 2) / num_feats).
    """
    if not isinstance(mask, torch.Tensor):
        if len(mask) != 3:
            raise ValueError(f"sine_position_encoding: expected a mask [N, H, W] or a shape (N, H, W), got {mask}")
        mask = torch.zeros(tuple(mask), dtype=torch.bool, device=device)
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask: expected bool [N, H, W], got {mask.dtype} {tuple(mask.shape)}")
    if num_feats % 2:
        raise ValueError(f"num_feats must be even (sin/cos pairs), got {num_feats}")
    not_mask = (~mask).to(dtype)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    if normalize:
        y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=dtype, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    n, h, w = mask.shape

    def embed(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[..., None] / dim_t  # [N, H, W, F]
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=4).view(n, h, w, num_feats)

    return torch.cat([embed(y_embed), embed(x_embed)], dim=3).permute(0, 3, 1, 2)


def level_masks(image_sizes: Sequence[Sequence[int]], padded_size: Sequence[int],
                feature_shapes: Sequence[Sequence[int]], device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Per-level padding masks of a padded batch: True = padding.

    image_sizes: [(h, w)] * N unpadded; padded_size: (H, W) of the batch tensor; feature_shapes: [(H_l, W_l)] * L.
    A level's valid extent is ceil(h * H_l / H) x ceil(w * W_l / W), i.e. every feature cell whose receptive field
    starts inside the image (ceil(h / s) for a stride s dividing H; also right for a P6 made by a stride-2 conv).
    Returns L masks [N, H_l, W_l] bool.
    """
    height, width = (int(v) for v in padded_size)
    for h, w in image_sizes:
        if not (0 < h <= height and 0 < w <= width):
            raise ValueError(f"image_sizes: expected each (h, w) within the padded size {(height, width)}, "
                             f"got {(h, w)}")
    masks = []
    for fh, fw in feature_shapes:
        mask = torch.ones(len(image_sizes), fh, fw, dtype=torch.bool, device=device)
        for i, (h, w) in enumerate(image_sizes):
            mask[i, : math.ceil(h * fh / height), : math.ceil(w * fw / width)] = False
        masks.append(mask)
    return masks


def valid_ratios(masks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpadded fraction of each level: masks L x [N, H_l, W_l] bool (True = padding) -> [N, L, 2] (x, y).

    Measured along the first row/column, as Deformable DETR does (the valid region is a top-left rectangle).
    """
    ratios = []
    for mask in masks:
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
        valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level as encoder reference points, in each level's normalised coordinates.

    ratios [N, L, 2] valid ratios (x, y). A centre ((j + 0.5) / W_l, (i + 0.5) / H_l) is divided by its own level's
    ratio (making it relative to the unpadded image) and multiplied by every level's ratio.
    Returns [N, S, L, 2] normalised (x, y).
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes_list(spatial_shapes)):
        # pixel centres: the values of linspace(0.5, h - 0.5, h), exact in float; arange keeps an exported graph's
        # size free (linspace's step count would fix it)
        ys = torch.arange(h, device=ratios.device).to(ratios.dtype) + 0.5
        xs = torch.arange(w, device=ratios.device).to(ratios.dtype) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(1, -1) / (ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(1, -1) / (ratios[:, None, level, 0] * w)
        points.append(torch.stack([ref_x, ref_y], -1))  # [N, H_l*W_l, 2]
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def _ffn(hidden_dim: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(ffn_dim, hidden_dim), nn.Dropout(dropout))


# Tokens per slice of an encoder layer at inference (DeformableEncoderLayer._forward_slices)
_ENCODER_SLICE = 2048


class DeformableEncoderLayer(nn.Module):
    """MSDA self-attention over all levels, then an FFN; post-norm (each sub-layer: norm(x + dropout(f(x))))."""

    def __init__(self, hidden_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(hidden_dim, num_levels, num_heads, num_points)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.ffn = _ffn(hidden_dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: SpatialShapes, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src, pos [N, S, C]; reference_points [N, S, L, 2]; padding_mask [N, S] bool or None -> [N, S, C].

        At inference on the gather formulation (eval mode, no autograd: see _forward_slices) the tokens go through
        the layer a slice at a time, with the same values."""
        if not self.training and not torch.is_grad_enabled() and resolve_impl(src.device) == "gather":
            return self._forward_slices(src, pos, reference_points, spatial_shapes, padding_mask)
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask=padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))

    def _forward_slices(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                        spatial_shapes: SpatialShapes, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """forward() for inference, _ENCODER_SLICE tokens at a time after the values are projected: every step but
        the value projection is per token, and a slice's intermediates (a few MB) stay in the CPU's caches where the
        whole layer's (20-80 MB each at 800x1216) would make a pass through memory per op. On one CPU thread an
        800x1216 layer goes 0.37 -> 0.26 s (benchmarks/README.md). Row-wise ops (matrix products,
        norms) on a slice of rows: the same values as the whole layer's (tests/models/test_deformable.py)."""
        attn = self.self_attn
        shapes = spatial_shapes_list(spatial_shapes)
        gather = GatherSlices(attn.project_value(src, padding_mask), shapes)
        out = torch.empty_like(src)
        for t0 in range(0, src.shape[1], _ENCODER_SLICE):
            part = slice(t0, t0 + _ENCODER_SLICE)
            x = src[:, part]
            locations, weights = attn.sample_points(x + pos[:, part], reference_points[:, part], shapes)
            x = self.norm1(x + attn.output_proj(gather(locations, weights)))
            out[:, part] = self.norm2(x + self.ffn(x))
        return out


class DeformableDecoderLayer(nn.Module):
    """Query self-attention (MHA, query_pos added to q and k), MSDA cross-attention into the encoder memory, FFN;
    post-norm."""

    def __init__(self, hidden_dim: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = MultiScaleDeformableAttention(hidden_dim, num_levels, num_heads, num_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = _ffn(hidden_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, spatial_shapes: SpatialShapes,
                memory_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tgt, query_pos [N, Q, C]; reference_points [N, Q, L, 2]; memory [N, S, C];
        memory_padding_mask [N, S] bool or None -> [N, Q, C]."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                               padding_mask=memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.ffn(tgt))


class DeformableTransformer(nn.Module):
    """Deformable DETR encoder-decoder, single stage, reference points never refined (ISDA's configuration).

    forward(features, masks) -> (hs [num_decoder_layers, N, Q, C] every decoder layer's output,
    reference_points [N, Q, 2] normalised (x, y) (from the query embedding only, the same for every image),
    memory [N, S, C] the encoder output, levels flattened row-major and concatenated).
    """

    def __init__(self, hidden_dim: int = 256, num_heads: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 ffn_dim: int = 1024, dropout: float = 0.1, num_levels: int = 4, num_points: int = 4,
                 num_queries: int = 300) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (half x, half y sine features), got {hidden_dim}")
        self.hidden_dim, self.num_levels, self.num_queries = hidden_dim, num_levels, num_queries
        layer_args = (hidden_dim, num_levels, num_heads, num_points, ffn_dim, dropout)
        self.encoder = nn.ModuleList(DeformableEncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DeformableDecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.query_embedding = nn.Embedding(num_queries, 2 * hidden_dim)  # [query_pos | content query]
        self.reference_points = nn.Linear(hidden_dim, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: xavier on every layer matrix, then MSDA's own init; level embed ~ N(0, 1);
        the query embedding keeps nn.Embedding's N(0, 1)."""
        for layer in (*self.encoder, *self.decoder):
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for module in layer.modules():
                if isinstance(module, MultiScaleDeformableAttention):
                    module.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def _check(self, features: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]]) -> None:
        if len(features) != self.num_levels:
            raise ValueError(f"features: expected {self.num_levels} levels, got {len(features)}")
        n = features[0].shape[0]
        for level, feat in enumerate(features):
            if feat.dim() != 4 or feat.shape[:2] != (n, self.hidden_dim):
                raise ValueError(f"features[{level}]: expected [N={n}, C={self.hidden_dim}, H_l, W_l], "
                                 f"got shape {tuple(feat.shape)}")
        if masks is None:
            return
        if len(masks) != self.num_levels:
            raise ValueError(f"masks: expected {self.num_levels} masks or None, got {len(masks)}")
        for level, (feat, mask) in enumerate(zip(features, masks)):
            expected = (n, *feat.shape[2:])
            if mask.shape != expected or mask.dtype != torch.bool:
                raise ValueError(f"masks[{level}]: expected bool {expected} (True = padding), "
                                 f"got {mask.dtype} {tuple(mask.shape)}")

    def flatten(self, features: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], list[tuple[int, int]]]:
        """Levels -> (src [N, S, C], pos [N, S, C] sine + level embedding, padding_mask [N, S] or None, shapes)."""
        srcs, poss, flat_masks, shapes = [], [], [], []
        for level, feat in enumerate(features):
            n, c, h, w = feat.shape
            shapes.append((h, w))
            mask = masks[level] if masks is not None else torch.zeros(n, h, w, dtype=torch.bool, device=feat.device)
            pos = sine_position_encoding(mask, num_feats=c // 2, dtype=feat.dtype)
            srcs.append(feat.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level])
            flat_masks.append(mask.flatten(1))
        padding_mask = torch.cat(flat_masks, 1) if masks is not None else None
        if padding_mask is not None and padding_mask.device.type == "cpu" and not is_exporting() \
                and not bool(padding_mask.any()):
            padding_mask = None  # no padding (one image, or images of one size): the 12 layers skip zeroing nothing
        return torch.cat(srcs, 1), torch.cat(poss, 1), padding_mask, shapes

    def forward(self, features: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None,
                between: Optional[Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features: L maps [N, C, H_l, W_l]; masks: L bool [N, H_l, W_l] (True = padding; see level_masks) or None.

        Returns hs [num_decoder_layers, N, Q, C], reference_points [N, Q, 2] in [0, 1], memory [N, S, C].

        between(d, tgt [N, Q, C], reference_points [N, Q, 2]) -> (tgt, reference_points), optional (not in Deformable
        DETR or ISDA): called after every decoder layer d but the last; what it returns is layer d + 1's input (hs
        keeps layer d's own output). With it, reference_points is returned per layer, [num_decoder_layers, N, Q, 2]:
        the points each layer sampled around.
        """
        self._check(features, masks)
        src, pos, padding_mask, shapes = self.flatten(features, masks)
        n = src.shape[0]
        ratios = (valid_ratios(masks, src.dtype) if masks is not None
                  else src.new_ones(n, self.num_levels, 2))
        memory = src
        enc_ref = encoder_reference_points(shapes, ratios)
        for layer in self.encoder:
            memory = layer(memory, pos, enc_ref, shapes, padding_mask)
        query_pos, tgt = self.query_embedding.weight.split(self.hidden_dim, dim=1)
        query_pos, tgt = query_pos.expand(n, -1, -1), tgt.expand(n, -1, -1)
        reference_points = self.reference_points(query_pos).sigmoid()  # [N, Q, 2]
        dec_ref = reference_points[:, :, None] * ratios[:, None]  # [N, Q, L, 2]
        hs, layer_refs = [], []
        for d, layer in enumerate(self.decoder):
            tgt = layer(tgt, query_pos, dec_ref, memory, shapes, padding_mask)
            hs.append(tgt)
            layer_refs.append(reference_points)
            if between is not None and d + 1 < len(self.decoder):
                tgt, reference_points = between(d, tgt, reference_points)
                dec_ref = reference_points[:, :, None] * ratios[:, None]
        return torch.stack(hs), reference_points if between is None else torch.stack(layer_refs), memory
