"""Multi-scale deformable attention (Deformable DETR's MSDA core) in pure PyTorch: embedding_bag or F.grid_sample."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from istr.ops.tracing import is_exporting

__all__ = ["IMPLS", "GatherSlices", "check_padding_mask", "deform_attn_impl", "ms_deform_attn",
           "ms_deform_attn_projected", "projecting_later_is_cheaper", "resolve_impl", "spatial_shapes_list"]

SpatialShapes = Union[Sequence[Sequence[int]], torch.Tensor]

IMPLS = ("auto", "gather", "grid_sample")
_default_impl = "auto"  # set by deform_attn_impl(); a plain module global so that torch.compile can guard on it


def spatial_shapes_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """[(H_l, W_l), ...] from a list of pairs or an int64 tensor [L, 2] (a tensor on an accelerator syncs once).
    Symbolic sizes (torch.SymInt, while torch.export traces) are kept as they are, so the graph stays dynamic."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes: expected an integer tensor [L, 2], "
                             f"got shape {tuple(spatial_shapes.shape)}")
        if spatial_shapes.is_floating_point():
            raise TypeError(f"spatial_shapes: expected an integer tensor, got dtype {spatial_shapes.dtype}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = []
    for shape in spatial_shapes:
        if len(shape) == 2 and any(isinstance(s, torch.SymInt) for s in shape):
            shapes.append((shape[0], shape[1]))  # sizes of a graph being exported: int() would fix them to one size
            continue
        if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"spatial_shapes: expected pairs of positive ints (H_l, W_l), got {list(spatial_shapes)}")
        shapes.append((int(shape[0]), int(shape[1])))
    if not shapes:
        raise ValueError("spatial_shapes: expected at least one level, got none")
    return shapes


def _check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl


@contextlib.contextmanager
def deform_attn_impl(impl: str) -> Iterator[None]:
    """Within the block, ms_deform_attn calls that pass no `impl` use this one ("auto", "gather", "grid_sample").

    For a model that must run the F.grid_sample formulation (e.g. to export it with a tool that does not trace
    embedding_bag): `with deform_attn_impl("grid_sample"): model(images)`. Process-wide (a module global, not
    thread-local); nested blocks restore the outer choice on exit.
    """
    global _default_impl
    impl = _check_impl(impl)
    previous, _default_impl = _default_impl, impl
    try:
        yield
    finally:
        _default_impl = previous


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
                   attention_weights: torch.Tensor, impl: Optional[str] = None) -> torch.Tensor:
    """Attention-weighted sum of bilinear samples of a flattened multi-level value map.

    value: [N, S, M, D], the L levels flattened row-major (y, x) and concatenated, S = sum(H_l * W_l);
    spatial_shapes: [(H_l, W_l)] * L, or an int64 tensor [L, 2];
    sampling_locations: [N, Lq, M, L, P, 2] normalised (x, y), 0 and 1 being the outer edges of the map
    (samples at x * W_l - 0.5 in pixel-centre coordinates; outside the map reads zero, as the CUDA kernel does);
    attention_weights: [N, Lq, M, L, P] (softmax-normalised by the caller, not checked);
    impl: "gather" (one embedding_bag over a channels-last table with a custom backward; on CPU an 800x1333
    encoder layer runs 3.8x faster forward and 2.7x forward+backward, benchmarks/results/deform_attn_cpu.md),
    "grid_sample" (one F.grid_sample per level; traces and exports), "auto" (gather on CPU, grid_sample on other
    devices, where gather is unmeasured, and whenever torch.compile/export, jit tracing or ONNX export is running),
    or None: the choice of the enclosing `deform_attn_impl(...)` block, "auto" outside one. The two agree to float
    rounding, values and gradients.
    Returns [N, Lq, M * D] (heads concatenated). Differentiable w.r.t. all three tensors.
    """
    impl = resolve_impl(value.device, impl)
    shapes = spatial_shapes_list(spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    if impl == "gather":
        return _ms_deform_attn_gather(value, shapes, sampling_locations, attention_weights)
    return _ms_deform_attn_grid_sample(value, shapes, sampling_locations, attention_weights)


def _ms_deform_attn_grid_sample(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor) -> torch.Tensor:
    """The F.grid_sample formulation: one bilinear grid_sample per level, weighted and summed by einsum."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
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


# ------------------------------------------------------------------------------------------------ gather path
#
# The levels are copied into one table with a zero border (2 pixels on every side), heads first and channels last:
# rows (head, n, level, y + 2, x + 2) of D values. A sample's pixel coordinate is clamped to [-2, W] (resp. H)
# before the floor, so that its four corners always land in the table; a corner outside the map reads the
# border's zero, exactly as grid_sample's zeros padding, and a sample clamped from further out has all four corners
# in the border (its value and every gradient are zero, as grid_sample's). The whole op is then one embedding_bag
# with one bag per (n, query, head) of L*P*4 (row, weight) pairs, weight = attention x bilinear weight.
# Backward, for the weights: the dot of each bag's output gradient with each of its rows (one sampled dense-dense
# matmul over the bag-by-row pattern), then the chain rule to the attention weights and the locations written out
# (a handful of elementwise ops). For the value: a scatter of the output gradient, done as gathers: the points
# sorted by their top-left row (one sort, shared by the four corners), one embedding_bag per corner summing each
# row's points, and the four results added with their one-pixel shifts. Head-major rows keep a scatter's sources
# (the bags of one head around one place) close together in memory.
# With fewer corners than table rows (decoder cross-attention: a few hundred queries over the whole map), the
# bordered copy and the per-row passes would cost more than the samples: the bags then read value [N*S*M, D]
# itself, a corner outside the map reading a clamped row with weight 0 (and no gradient), and the value's gradient
# sorts the corners themselves and sums each distinct row read once.


class _Layout:
    """Row arithmetic of the zero-bordered head-major table for value [N, S, M, D] and levels `shapes`."""

    border = 2

    def __init__(self, n: int, m: int, shapes: list[tuple[int, int]]) -> None:
        self.n, self.m, self.shapes = n, m, shapes
        self.padded = [(h + 2 * self.border, w + 2 * self.border) for h, w in shapes]
        self.starts, self.padded_starts, total, padded_total = [], [], 0, 0
        for (h, w), (hp, wp) in zip(shapes, self.padded):
            self.starts.append(total)
            self.padded_starts.append(padded_total)
            total, padded_total = total + h * w, padded_total + hp * wp
        self.padded_pixels = padded_total  # per (head, image)
        self.rows = m * n * padded_total
        self._cache: dict = {}

    def levels(self, table: torch.Tensor):
        """Per level: (H, W), the level's first row in value, and its [M, N, H+4, W+4, D] view of the table."""
        d = table.shape[-1]
        per_map = table.view(self.m, self.n, self.padded_pixels, d)
        for (h, w), (hp, wp), start, padded_start in zip(self.shapes, self.padded, self.starts, self.padded_starts):
            yield (h, w), start, per_map[:, :, padded_start:padded_start + hp * wp].view(self.m, self.n, hp, wp, d)

    def pad(self, value: torch.Tensor) -> torch.Tensor:
        """value [N, S, M, D] -> the zero-bordered table [M * N * Sp, D]."""
        n, _, m, d = value.shape
        b = self.border
        table = value.new_empty(self.rows, d)
        for (h, w), start, level in self.levels(table):
            interior = value[:, start:start + h * w].reshape(n, h, w, m, d).permute(3, 0, 1, 2, 4)
            level[:, :, b:h + b, b:w + b].copy_(interior)
            for edge in (level[:, :, :b], level[:, :, h + b:], level[:, :, b:h + b, :b], level[:, :, b:h + b, w + b:]):
                edge.zero_()
        return table

    def _tables(self, levels: int, p: int, device: torch.device) -> dict:
        """The small operands of the bordered path's arithmetic, made once per layout (the no-grad path reuses them
        for every slice of queries). They are written out over (L, P), so that each op's inner loop runs over L * P
        contiguous values of both operands (a stride-0 P axis makes an inner loop of P elements: 3x slower; same
        values): the map sizes (W_l, H_l) [2, 1, L, P] (float32 and float64), the top-left rows' base
        [N, 1, M, L, P] and the padded widths [L, P] (in `exact`, a float type that holds the table's row numbers
        exactly), and the four corners' row offsets [4, L, P] (in `index`, the rows' integer type)."""
        key = (levels, p, device)
        if key not in self._cache:
            exact = torch.float32 if self.rows < 2 ** 24 else torch.float64
            index = torch.int32 if self.rows < 2 ** 31 else torch.int64
            size = torch.tensor([[w for _, w in self.shapes], [h for h, _ in self.shapes]], dtype=torch.float64,
                                device=device)[:, None, :, None].expand(2, 1, levels, p).contiguous()
            widths = torch.tensor([wp for _, wp in self.padded], dtype=exact, device=device)
            starts = torch.tensor(self.padded_starts, dtype=exact, device=device) + (widths + 1) * self.border
            maps = (torch.arange(self.m, dtype=exact, device=device)[None, :] * self.n
                    + torch.arange(self.n, dtype=exact, device=device)[:, None]) * self.padded_pixels  # [N, M]
            offsets = torch.tensor([[0, 1, wp, wp + 1] for _, wp in self.padded], dtype=index, device=device)
            self._cache[key] = {
                torch.float64: size, torch.float32: size.float(),
                "base": (maps[:, :, None] + starts)[:, None, :, :, None].expand(self.n, 1, self.m, levels, p).contiguous(),
                "widths": widths[:, None].expand(levels, p).contiguous(),
                "corners": offsets.t()[:, :, None].expand(4, levels, p).contiguous(),
                "exact": exact, "index": index}
        return self._cache[key]

    def top_left(self, x0: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """x0, y0 [N * Lq * M, L, P]: the integer (floored) pixel coordinates, in [-2, W_l] and [-2, H_l] -> the
        top-left corners' rows [N * Lq * M, L, P] (int32, or int64 for a table of 2^31 rows or more)."""
        levels, p = x0.shape[1:]
        tables = self._tables(levels, p, x0.device)
        exact = tables["exact"]  # integers computed exactly in floats
        shape = (self.n, -1, self.m, levels, p)
        rows = torch.add(tables["base"], x0.view(shape).to(exact)).addcmul_(y0.view(shape).to(exact), tables["widths"])
        rows.nan_to_num_(0.0)  # a NaN location reads row 0, with a NaN weight
        return rows.to(tables["index"]).view(x0.shape)

    def corner_index(self, top_left: torch.Tensor) -> torch.Tensor:
        """top_left [B, L, P] -> [B, 4, L, P] rows of the corners (y, x), (y, x+1), (y+1, x), (y+1, x+1) (the
        weights' layout: corner-major within each bag)."""
        offsets = self._tables(*top_left.shape[1:], top_left.device)["corners"]
        index = torch.empty(top_left.shape[0], 4, *top_left.shape[1:], dtype=top_left.dtype, device=top_left.device)
        return torch.add(top_left[:, None], offsets, out=index)

    def unbordered_corners(self, x0: torch.Tensor, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0, y0 [B, L, P] floored pixel coordinates -> the four corners' rows of value [N, S, M, D] viewed as
        [N * S * M, D], clamped into the map, [B, 4, L, P], and whether each corner is inside the map (bool)."""
        dev, rows = x0.device, self.n * sum(h * w for h, w in self.shapes) * self.m
        exact = torch.float32 if rows < 2 ** 24 else torch.float64
        widths = torch.tensor([w for _, w in self.shapes], dtype=exact, device=dev)[:, None]  # [L, 1]
        heights = torch.tensor([h for h, _ in self.shapes], dtype=exact, device=dev)[:, None]
        starts = torch.tensor(self.starts, dtype=exact, device=dev)
        images = torch.arange(self.n, dtype=exact, device=dev) * (rows // (self.n * self.m))
        base = ((images[:, None] + starts) * self.m)[:, None, None, :, None] \
            + torch.arange(self.m, dtype=exact, device=dev)[None, None, :, None, None]  # [N, 1, M, L, 1]
        shape = (self.n, -1, self.m, *x0.shape[1:])
        x0, y0 = x0.view(shape).to(exact).nan_to_num(0.0), y0.view(shape).to(exact).nan_to_num(0.0)
        index = torch.empty(*x0.shape[:3], 4, *x0.shape[3:], dtype=exact, device=dev)
        inside = torch.empty(index.shape, dtype=torch.bool, device=dev)
        for corner, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            x, y = x0 + dx, y0 + dy
            torch.logical_and((x >= 0) & (x < widths), (y >= 0) & (y < heights), out=inside[:, :, :, corner])
            x = torch.minimum(x.clamp_(min=0), widths - 1)
            y = torch.minimum(y.clamp_(min=0), heights - 1)
            torch.add(base, (y * widths + x) * self.m, out=index[:, :, :, corner])
        index_int = torch.int32 if rows < 2 ** 31 else torch.int64
        return index.to(index_int).view(-1, 4, *x0.shape[3:]), inside.view(-1, 4, *x0.shape[3:])


def _corners(layout: _Layout, few: bool, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
             value_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The bags of sampling_locations [N, Lq, M, L, P, 2] / attention_weights [N, Lq, M, L, P] (any Lq: the forward
    passes all queries, the no-grad path a slice of them) -> (index [B, 4, L, P] rows of the table, weight [B, 4, L, P]
    = attention x bilinear weight, frac [2, B, L, P], top_left [B, L, P] or None, inside [B, 4, L, P] or None),
    B = N * Lq * M. few: the corners index value itself (see the notes above), else the zero-bordered table."""
    n, lq, m, levels, p, _ = sampling_locations.shape
    bags, dev = n * lq * m, sampling_locations.device
    dtype = torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    tables = layout._tables(levels, p, dev)
    size = tables[dtype] if dtype in tables else tables[torch.float64].to(dtype)  # [2 (x, y), 1, L, P]
    # planar coordinates [2, B, L, P], computed with grid_sample's arithmetic (align_corners=False) to the
    # last bit: g = 2 loc - 1, pixel = (g + 1) * size / 2 - 0.5
    xy = torch.empty(2, bags, levels, p, dtype=dtype, device=dev)
    torch.mul(sampling_locations.reshape(bags, levels, p, 2).permute(3, 0, 1, 2), 2, out=xy)
    xy.sub_(1).add_(1).mul_(size / 2).sub_(0.5)
    xy = torch.minimum(xy.clamp_(min=-layout.border), size, out=xy)  # NaN stays NaN
    xy0 = xy.floor()
    frac = xy.sub_(xy0)
    fx, fy = frac
    a = attention_weights.reshape(bags, levels, p)
    ox = 1 - fx
    ay1 = fy * a
    ay0 = (1 - fy).mul_(a)
    weight = torch.empty(bags, 4, levels, p, dtype=value_dtype, device=dev)  # corners (y, x) = 00, 01, 10, 11
    for corner, (wy, wx) in enumerate(((ay0, ox), (ay0, fx), (ay1, ox), (ay1, fx))):
        torch.mul(wy, wx, out=weight[:, corner])
    if few:
        # few samples (decoder queries): read the value itself, no bordered copy (an O(S) pass); corners
        # outside the map read a clamped row with weight 0
        index, inside = layout.unbordered_corners(xy0[0], xy0[1])
        weight.mul_(inside)
        return index, weight, frac, None, inside
    top_left = layout.top_left(xy0[0], xy0[1])
    return layout.corner_index(top_left), weight, frac, top_left, None


class _GatherMSDA(torch.autograd.Function):
    """ms_deform_attn as one embedding_bag (see the notes above); returns [N * Lq * M, D]."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        n, _, m, d = value.shape
        layout = _Layout(n, m, shapes)
        few = _few_samples(layout, sampling_locations)
        table = value.reshape(-1, d) if few else layout.pad(value)
        index, weight, frac, top_left, inside = _corners(layout, few, sampling_locations, attention_weights,
                                                         value.dtype)
        ctx.layout, ctx.value_shape = layout, value.shape
        ctx.locations_shape, ctx.locations_dtype = sampling_locations.shape, sampling_locations.dtype
        ctx.save_for_backward(table, top_left, index, weight, frac, attention_weights, inside)
        return F.embedding_bag(index.flatten(1), table, per_sample_weights=weight.flatten(1), mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        table, top_left, index, weight, frac, attention_weights, inside = ctx.saved_tensors
        layout: _Layout = ctx.layout
        grad = grad.contiguous()
        grad_value = grad_locations = grad_attention = None
        if ctx.needs_input_grad[0]:
            if top_left is None:  # the few-samples path read the value directly
                grad_value = _value_grad_few(grad, index, weight, table.shape[0]).view(ctx.value_shape)
            else:
                grad_value = _value_grad(grad, top_left, weight, layout)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight = _weight_grad(grad, table, index.flatten(1), weight, table.shape[0])
            if inside is not None:  # a corner outside the map read a real (clamped) row: it has no gradient
                grad_weight.mul_(inside)
            grad_locations, grad_attention = _location_and_attention_grads(grad_weight, frac, attention_weights,
                                                                          layout)
            grad_locations = grad_locations.view(ctx.locations_shape).to(ctx.locations_dtype)
            grad_attention = grad_attention.view(attention_weights.shape).to(attention_weights.dtype)
        return grad_value, grad_locations, grad_attention, None


def _weight_grad(grad: torch.Tensor, table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                 rows: int) -> torch.Tensor:
    """d out / d weight: [B, 4, L, P], the dot of grad [B, D] row b with each table row bag b reads (index [B, K])."""
    bags, per_bag = index.shape
    if grad.dtype not in (torch.float32, torch.float64):  # sampled_addmm has no CPU kernel for bf16/fp16
        return _weight_grad(grad.float(), table.float(), index, weight.float(), rows).to(grad.dtype)
    crow = torch.arange(0, bags * per_bag + 1, per_bag, dtype=index.dtype, device=index.device)
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        # the pattern's values are multiplied by beta = 0 (a NaN weight gives a NaN gradient, as it should)
        pattern = torch.sparse_csr_tensor(crow, index.flatten(), weight.flatten(), (bags, rows),
                                          check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0)
    return dots.values().view(weight.shape)


def _location_and_attention_grads(grad_weight: torch.Tensor, frac: torch.Tensor, attention_weights: torch.Tensor,
                                  layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """weight[(cy, cx)] = a * wy[cy] * wx[cx], w[0] = 1 - f, w[1] = f, f = frac(pixel), pixel = loc * size - .5,
    clamped (where it is, every corner reads the zero border, so grad_weight is zero) -> (d/d loc, d/d a)."""
    fx, fy = frac
    a = attention_weights.reshape(fx.shape)
    g00, g01, g10, g11 = grad_weight.to(frac.dtype).unbind(1)  # [B, L, P] each
    ox, oy = 1 - fx, 1 - fy
    top = torch.addcmul(g00 * ox, g01, fx)  # sum over cx of g[0, cx] * wx[cx]
    bottom = torch.addcmul(g10 * ox, g11, fx)
    grad_attention = torch.addcmul(top * oy, bottom, fy)
    size = [[w for _, w in layout.shapes], [h for h, _ in layout.shapes]]
    grad_locations = torch.empty(*fx.shape, 2, dtype=frac.dtype, device=frac.device)
    grad_x = torch.addcmul((g01 - g00).mul_(oy), g11 - g10, fy).mul_(a)  # d pixel / d loc = size
    torch.mul(grad_x, torch.tensor(size[0], dtype=frac.dtype, device=frac.device)[:, None], out=grad_locations[..., 0])
    grad_y = (bottom - top).mul_(a)
    torch.mul(grad_y, torch.tensor(size[1], dtype=frac.dtype, device=frac.device)[:, None], out=grad_locations[..., 1])
    return grad_locations, grad_attention


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] for a contiguous [R, 4] tensor; float32 rows move as one 16-byte complex128 (2x faster)."""
    if rows.dtype == torch.float32:
        packed = rows.view(torch.complex128).view(-1)
        return packed.index_select(0, index).view(torch.float32).view(-1, 4)
    return rows.index_select(0, index)


def _value_grad_few(grad: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """d out / d table [rows, D] for grad [B, D] when the corners (index [B, ...], weight alike) are few: one sort
    of the corners, one embedding_bag bag per distinct row read, written into zeros."""
    keys_sorted, order = torch.sort(index.flatten())
    read, counts = torch.unique_consecutive(keys_sorted, return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    source = torch.div(order, math.prod(index.shape[1:]), rounding_mode="floor")
    summed = F.embedding_bag(source, grad, offsets, per_sample_weights=weight.flatten().index_select(0, order),
                             mode="sum")
    return grad.new_zeros(rows, grad.shape[1]).index_copy_(0, read.long(), summed)


def _value_grad(grad: torch.Tensor, top_left: torch.Tensor, weight: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """d out / d value for grad [B, D]: [N, S, M, D]."""
    points_per_bag = top_left.shape[1] * top_left.shape[2]
    keys = top_left.flatten()
    keys_sorted, order = torch.sort(keys)
    bounds = torch.arange(layout.rows, dtype=keys.dtype, device=keys.device)
    offsets = torch.searchsorted(keys_sorted, bounds)  # scatter bag r = the points whose top-left corner is row r
    source = torch.div(order, points_per_bag, rounding_mode="floor")  # the output row each point came from
    weight_sorted = _gather_rows(weight.permute(0, 2, 3, 1).reshape(-1, 4), order).t().contiguous()  # [4, B*L*P]
    n, m, d, b = layout.n, layout.m, grad.shape[1], layout.border
    grad_value = grad.new_empty(n, sum(h * w for h, w in layout.shapes), m, d)
    for corner, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        at_top_left = F.embedding_bag(source, grad, offsets, per_sample_weights=weight_sorted[corner], mode="sum")
        for (h, w), start, level in layout.levels(at_top_left):
            # corner (dy, dx) of the top-left corner at bordered (y, x) is pixel (y + dy - b, x + dx - b)
            src = level[:, :, b - dy:h + b - dy, b - dx:w + b - dx].permute(1, 2, 3, 0, 4)
            dst = grad_value[:, start:start + h * w].view(n, h, w, m, d)
            if corner == 0:
                dst.copy_(src)
            else:
                dst.add_(src)
    return grad_value


def _few_samples(layout: _Layout, sampling_locations: torch.Tensor) -> bool:
    """Whether the bags read value itself (fewer corners than table rows: decoder queries) or the bordered table."""
    n, lq, m, levels, p, _ = sampling_locations.shape
    return 4 * n * lq * m * levels * p <= layout.rows


# Queries per slice of the no-grad path: about 2^16 sample points, so that a slice's intermediates (a few MB) stay in
# the CPU's caches instead of making ~25 passes over 10-40 MB tensors each (an 800x1216 encoder layer: 2.6 M points).
_NO_GRAD_POINTS = 2 ** 16


def resolve_impl(device: torch.device, impl: Optional[str] = None) -> str:
    """The formulation ms_deform_attn(..., impl=impl) runs on `device`: "gather" or "grid_sample" (None: the
    enclosing deform_attn_impl block's choice; "auto": gather on CPU unless compiling, exporting or tracing)."""
    impl = _check_impl(_default_impl if impl is None else impl)
    if impl == "auto":
        return "gather" if torch.device(device).type == "cpu" and not is_exporting() else "grid_sample"
    return impl


class GatherSlices:
    """ms_deform_attn's gather formulation without autograd, for many slices of queries over one value map.

    The value's zero-bordered table is built once; each call prepares and sums the bags of one slice of queries.
    For inference that processes its queries a slice at a time (an encoder layer: attention, norms and FFN of a slice
    of tokens while they are in cache): `gather = GatherSlices(value, shapes)`, then `gather(locations[:, a:b],
    weights[:, a:b])` equals `ms_deform_attn(value, shapes, locations, weights, impl="gather")[:, a:b]` bit for bit.
    value [N, S, M, D]; few: read value itself instead of the bordered table (see the notes above; the choice
    _ms_deform_attn_gather makes when there are fewer corners than table rows). Returns [N, Lq, M * D].
    """

    def __init__(self, value: torch.Tensor, spatial_shapes: SpatialShapes, few: bool = False) -> None:
        n, _, m, d = value.shape
        self.layout, self.few, self.dtype = _Layout(n, m, spatial_shapes_list(spatial_shapes)), few, value.dtype
        with torch.no_grad():
            self.table = value.reshape(-1, d) if few else self.layout.pad(value)

    def __call__(self, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, m, d = self.layout.n, self.layout.m, self.table.shape[1]
        lq, levels, p = sampling_locations.shape[1], *sampling_locations.shape[3:5]
        if out is None:
            out = self.table.new_empty(n, lq, m * d)
        step = max(1, _NO_GRAD_POINTS // (n * m * levels * p))
        with torch.no_grad():
            for q0 in range(0, lq, step):
                q1 = min(q0 + step, lq)
                index, weight, *_ = _corners(self.layout, self.few, sampling_locations[:, q0:q1],
                                             attention_weights[:, q0:q1], self.dtype)
                out[:, q0:q1] = F.embedding_bag(index.flatten(1), self.table, per_sample_weights=weight.flatten(1),
                                                mode="sum").view(n, q1 - q0, m * d)
        return out


def _ms_deform_attn_gather(value: torch.Tensor, shapes: list[tuple[int, int]], sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor) -> torch.Tensor:
    """MSDA as one embedding_bag over the zero-bordered channels-last value table (see the notes above). Without
    autograd (inference) the bags are prepared and summed a slice of queries at a time (GatherSlices): the same
    arithmetic per bag, so the same values bit for bit, without the full-size intermediates the backward would need."""
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        return _GatherMSDA.apply(value, sampling_locations, attention_weights, shapes).view(n, lq, m * d)
    few = _few_samples(_Layout(n, m, shapes), sampling_locations)
    return GatherSlices(value, shapes, few)(sampling_locations, attention_weights)


def check_padding_mask(padding_mask: Optional[torch.Tensor], n: int, s: int) -> None:
    """A clear error unless padding_mask is None or bool [N, S] (True = padding) for N images of S tokens."""
    if padding_mask is not None and (padding_mask.shape != (n, s) or padding_mask.dtype != torch.bool):
        raise ValueError(f"padding_mask: expected bool [N, S] = {(n, s)}, got {padding_mask.dtype} "
                         f"{tuple(padding_mask.shape)}")


def projecting_later_is_cheaper(tokens: int, queries: int, heads: int, levels: int, points: int, head_dim: int) -> bool:
    """Whether ms_deform_attn_projected (per query and head: 4 * L * P corner rows of C values summed, then D x C) costs
    fewer multiply-adds than projecting all `tokens` values (tokens x M * D x C) first: queries * (4 * L * P + D) <
    tokens * D (C cancels). A decoder's 300 queries over an 800x1216 map's 20k tokens: 22x fewer."""
    return queries * (4 * levels * points + head_dim) < tokens * head_dim


def ms_deform_attn_projected(value_input: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                             attention_weights: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ms_deform_attn(value, ...) of the projected values value = value_input @ weight.T + bias, padded rows zeroed,
    viewed [N, S, M, D], without projecting the map: for inference with few queries (a decoder's cross-attention).

    The projection is linear and the attention a weighted sum of bilinear samples, so the two commute: each (query,
    head) bag sums the samples of value_input's rows (one embedding_bag over [N * S, C]; a padded row or a corner
    outside the map gets weight 0), the sum goes through the head's D rows of weight, and the head's bias is scaled by
    the bag's total weight. See projecting_later_is_cheaper for when it pays. The same values as projecting first, to
    float rounding (the sums run in another order: tests/ops/test_deform_attn.py); no autograd (call it under
    torch.no_grad or inference_mode).

    value_input [N, S, C]; weight [M * D, C], bias [M * D] or None (a Linear's); padding_mask [N, S] bool (True =
    padding) or None; the rest as ms_deform_attn. Returns [N, Lq, M * D].
    """
    shapes = spatial_shapes_list(spatial_shapes)
    if value_input.dim() != 3 or weight.dim() != 2 or weight.shape[1] != value_input.shape[2]:
        raise ValueError(f"value_input [N, S, C] and weight [M * D, C]: got shapes {tuple(value_input.shape)} and "
                         f"{tuple(weight.shape)}")
    n, s, c = value_input.shape
    lq, m = sampling_locations.shape[1], sampling_locations.shape[2]
    if weight.shape[0] % m:
        raise ValueError(f"weight: expected M * D rows for M = {m} heads, got {weight.shape[0]}")
    d = weight.shape[0] // m
    _check_inputs(value_input.view(n, s, 1, c).expand(n, s, m, c), shapes, sampling_locations, attention_weights)
    check_padding_mask(padding_mask, n, s)
    with torch.no_grad():
        index, bilinear, *_ = _corners(_Layout(n, m, shapes), True, sampling_locations, attention_weights,
                                       value_input.dtype)
        rows = torch.div(index, m, rounding_mode="floor")  # rows of value [N * S * M, D] -> rows of value_input
        if padding_mask is not None:
            bilinear.mul_(padding_mask.reshape(-1)[rows].logical_not_())
        sums = F.embedding_bag(rows.flatten(1), value_input.reshape(n * s, c), per_sample_weights=bilinear.flatten(1),
                               mode="sum")  # [N * Lq * M, C]
        out = torch.bmm(sums.view(n * lq, m, c).transpose(0, 1), weight.view(m, d, c).transpose(1, 2))  # [M, N*Lq, D]
        if bias is not None:
            total = bilinear.flatten(1).sum(1).view(n * lq, m).t()  # [M, N * Lq]: each bag's total weight
            out.add_(total[..., None] * bias.view(m, 1, d))
        return out.transpose(0, 1).reshape(n, lq, m * d)
