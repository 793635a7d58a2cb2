"""ms_deform_attn: the embedding_bag path equals the F.grid_sample path and a per-point bilinear loop (values and
gradients, float32 and float64, samples outside the map), impl selection, export fallback, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from istr.ops.deform_attn import deform_attn_impl, ms_deform_attn

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = {"odd": [(5, 7), (3, 4), (1, 3)], "tiny": [(1, 1), (2, 3), (4, 4), (6, 5)], "wide": [(2, 9)]}


def loop_reference(value, shapes, locations, weights):
    """One sample at a time: pixel (x * W - 0.5, y * H - 0.5), its four corners, those outside the map read 0."""
    n_img, _, n_heads, dim = value.shape
    _, n_q, _, _, n_points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(len(shapes))]
    out = []
    for n in range(n_img):
        for q in range(n_q):
            for m in range(n_heads):
                acc = value.new_zeros(dim)
                for level, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        x = locations[n, q, m, level, p, 0] * w - 0.5
                        y = locations[n, q, m, level, p, 1] * h - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yi < h and 0 <= xi < w:
                                    row = value[n, starts[level] + yi * w + xi, m]
                                    acc = acc + weights[n, q, m, level, p] * wy * wx * row
                out.append(acc)
    return torch.stack(out).view(n_img, n_q, n_heads * dim)


def make_inputs(shapes, dtype, n=2, n_q=4, n_heads=3, dim=5, n_points=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, n_levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(n, s, n_heads, dim, generator=g, dtype=torch.float64)
    # mostly in [-0.3, 1.3] (corners straddle the edges), plus points far outside on each side
    locations = torch.rand(n, n_q, n_heads, n_levels, n_points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if n_q:
        locations[0, 0, 0, :, 0] = torch.tensor([-2.5, 0.5], dtype=torch.float64)
        locations[0, -1, -1, :, -1] = torch.tensor([0.5, 3.0], dtype=torch.float64)
        locations[-1, 0, -1, :, 0] = torch.tensor([-0.4, 1.2], dtype=torch.float64)
    weights = torch.rand(n, n_q, n_heads, n_levels * n_points, generator=g, dtype=torch.float64).softmax(-1)
    weights = weights.view(n, n_q, n_heads, n_levels, n_points)
    return [t.to(dtype).requires_grad_() for t in (value, locations, weights)]


def value_and_grads(fn, inputs, upstream=None):
    out = fn(*inputs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype) \
        if upstream is None else upstream
    return out, torch.autograd.grad((out * upstream).sum(), inputs), upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("n_q", [4, 50], ids=["few_queries", "many_queries"])  # fewer / more corners than the
def test_gather_equals_grid_sample(shapes, dtype, n_q):  # bordered table has rows: each value-gradient path
    inputs = make_inputs(shapes, dtype, n_q=n_q)
    assert ((inputs[1] < 0) | (inputs[1] > 1)).any() and (inputs[1] < -2).any()
    out, grads, upstream = value_and_grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, impl="gather"), inputs)
    ref, ref_grads, _ = value_and_grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, impl="grid_sample"),
                                        inputs, upstream)
    assert out.dtype == dtype and out.shape == (2, n_q, 3 * 5)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_q", [4, 50], ids=["few_queries", "many_queries"])
def test_gather_without_autograd_equals_it_bit_for_bit(n_q, dtype, monkeypatch):
    """Inference prepares the bags a slice of queries at a time (here a few queries per slice, and a slice that does
    not divide Lq): the same values, bit for bit, as the autograd forward, far-outside and NaN points included."""
    import istr.ops.deform_attn as deform_attn

    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, dtype, n_q=n_q))
    locations[1, 1, 0, 0, 0, 0] = float("nan")
    with_grad = ms_deform_attn(value.requires_grad_(), shapes, locations, weights, impl="gather")
    value.requires_grad_(False)
    for points in (1, 3 * 3 * 3 * 7, 10 ** 6):  # one query per slice, 7 per slice, all at once
        monkeypatch.setattr(deform_attn, "_NO_GRAD_POINTS", points)
        with torch.no_grad():
            got = ms_deform_attn(value, shapes, locations, weights, impl="gather")
        assert torch.equal(got.isnan(), with_grad.isnan()) and with_grad.isnan().any()
        assert torch.equal(got.nan_to_num(), with_grad.detach().nan_to_num()), points


def test_gather_slices_equal_the_whole_op_slice_by_slice():
    """GatherSlices (the value's table built once, queries gathered a slice at a time, as an encoder layer does at
    inference): each slice, written into a caller's buffer, equals that slice of ms_deform_attn bit for bit."""
    from istr.ops.deform_attn import GatherSlices

    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, n_q=50))
    whole = ms_deform_attn(value, shapes, locations, weights, impl="gather")
    gather = GatherSlices(value, shapes)
    out = torch.full_like(whole, float("nan"))
    for a in range(0, 50, 17):
        got = gather(locations[:, a:a + 17], weights[:, a:a + 17], out=out[:, a:a + 17])
        assert got.data_ptr() == out[:, a:a + 17].data_ptr()
    assert torch.equal(out, whole)
    with torch.enable_grad():  # built from a tensor that requires grad: still no graph
        assert not GatherSlices(value.clone().requires_grad_(), shapes)(locations, weights).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
def test_projecting_after_sampling_equals_projecting_first(dtype, padded):
    """ms_deform_attn_projected (a decoder's inference: the samples of the unprojected tokens summed per bag, then
    projected per head, the bias scaled by the bag's total weight) equals grid_sample over the projected values with
    the padded tokens zeroed, to float rounding; sample points outside the map included."""
    from istr.ops.deform_attn import ms_deform_attn_projected

    shapes, heads, dim, channels = SHAPES["odd"], 3, 5, 7
    _, locations, weights = (t.detach() for t in make_inputs(shapes, dtype, n_q=6, n_heads=heads, dim=dim))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, sum(h * w for h, w in shapes), channels, generator=g, dtype=dtype)
    proj = torch.nn.Linear(channels, heads * dim).to(dtype)
    padding = torch.rand(tokens.shape[:2], generator=g) < 0.3 if padded else None
    with torch.no_grad():
        proj.bias.normal_(generator=g)
        value = proj(tokens)
        if padded:
            value = value.masked_fill(padding[..., None], 0.0)
        want = ms_deform_attn(value.view(2, -1, heads, dim), shapes, locations, weights, impl="grid_sample")
        got = ms_deform_attn_projected(tokens, shapes, locations, weights, proj.weight, proj.bias, padding)
    torch.testing.assert_close(got, want, **TOL[dtype])
    with pytest.raises(ValueError, match=r"weight: expected M \* D rows"):
        ms_deform_attn_projected(tokens, shapes, locations, weights, proj.weight[:-1], None)
    with pytest.raises(ValueError, match="padding_mask: expected bool"):
        ms_deform_attn_projected(tokens, shapes, locations, weights, proj.weight, None,
                                 torch.zeros(2, 3, dtype=torch.bool))


def test_projecting_later_pays_for_a_decoder_not_an_encoder():
    from istr.ops.deform_attn import projecting_later_is_cheaper

    tokens = 100 * 152 + 50 * 76 + 25 * 38 + 13 * 19  # isda_r50's P3..P6 at 800x1216
    assert projecting_later_is_cheaper(tokens, 300, heads=8, levels=4, points=4, head_dim=32)  # its decoder
    assert not projecting_later_is_cheaper(tokens, tokens, heads=8, levels=4, points=4, head_dim=32)  # its encoder


@pytest.mark.parametrize("impl", ["gather", "grid_sample"])
@pytest.mark.parametrize("case", ["few_queries", "many_queries"])
def test_both_equal_the_per_point_loop(impl, case):
    if case == "few_queries":
        shapes, inputs = SHAPES["odd"], make_inputs(SHAPES["odd"], torch.float64, n_q=2, n_points=2, seed=3)
    else:  # 2 x 8 x 4 x 2 corners read a table of 2 x 42 rows
        shapes = [(2, 3)]
        inputs = make_inputs(shapes, torch.float64, n_q=8, n_heads=1, n_points=2, seed=3)
    out, grads, upstream = value_and_grads(lambda v, l, w: ms_deform_attn(v, shapes, l, w, impl=impl), inputs)
    ref, ref_grads, _ = value_and_grads(lambda v, l, w: loop_reference(v, shapes, l, w), inputs, upstream)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=lambda m, name=name: f"grad {name}: {m}")


def test_gather_gradcheck():
    shapes = [(2, 3), (1, 2)]
    inputs = make_inputs(shapes, torch.float64, n=1, n_q=2, n_heads=2, dim=2, n_points=2, seed=2)
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, shapes, l, w, impl="gather"), inputs)


def test_gather_single_input_gradients_and_noncontiguous_value():
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float64, seed=4))
    strided = value.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # same values, other strides
    assert not strided.is_contiguous()
    out = ms_deform_attn(strided, shapes, locations, weights, impl="gather")
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, locations, weights, impl="grid_sample"),
                               rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), strided)  # only the value needs a gradient
    loc = locations.clone().requires_grad_()
    (grad_loc,) = torch.autograd.grad(ms_deform_attn(value, shapes, loc, weights, impl="gather").sum(), loc)
    with torch.no_grad():
        unchanged = ms_deform_attn(value, shapes, locations, weights, impl="gather")
    assert grad.shape == value.shape and grad_loc.shape == locations.shape and unchanged.grad_fn is None


@pytest.mark.parametrize("n_q", [4, 50], ids=["few_queries", "many_queries"])
def test_far_outside_reads_zero_and_nan_locations_give_nan_like_grid_sample(n_q):
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, n_q=n_q, seed=5))
    far = locations.clone()
    far[0] = 1e6
    far[1] = -1e6
    out = ms_deform_attn(value, shapes, far, weights, impl="gather")
    assert torch.equal(out, torch.zeros_like(out))
    broken = locations.clone()
    broken[1, 2, 0, 1, 0, 0] = float("nan")
    got = ms_deform_attn(value, shapes, broken, weights, impl="gather")
    want = ms_deform_attn(value, shapes, broken, weights, impl="grid_sample")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), **TOL[torch.float32])


def test_impl_selection_and_context_manager():
    shapes = SHAPES["tiny"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, seed=6))
    gather = ms_deform_attn(value, shapes, locations, weights, impl="gather")
    grid = ms_deform_attn(value, shapes, locations, weights, impl="grid_sample")
    assert not torch.equal(gather, grid)  # float rounding differs: the two are told apart below
    assert torch.equal(ms_deform_attn(value, shapes, locations, weights), gather)  # auto on CPU
    assert torch.equal(ms_deform_attn(value, shapes, locations, weights, impl="auto"), gather)
    with deform_attn_impl("grid_sample"):
        assert torch.equal(ms_deform_attn(value, shapes, locations, weights), grid)
        assert torch.equal(ms_deform_attn(value, shapes, locations, weights, impl="gather"), gather)  # explicit wins
        with deform_attn_impl("auto"):
            assert torch.equal(ms_deform_attn(value, shapes, locations, weights), gather)
        assert torch.equal(ms_deform_attn(value, shapes, locations, weights), grid)  # restored
    assert torch.equal(ms_deform_attn(value, shapes, locations, weights), gather)
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'gather', 'grid_sample'\), got 'cuda'"):
        ms_deform_attn(value, shapes, locations, weights, impl="cuda")
    with pytest.raises(ValueError, match="impl: expected one of"):
        with deform_attn_impl("fast"):
            pass


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_auto_takes_grid_sample_while_tracing():
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, seed=7))
    traced = torch.jit.trace(lambda v, l, w: ms_deform_attn(v, shapes, l, w), (value, locations, weights))
    graph = str(traced.graph)
    assert "grid_sampler" in graph and "embedding_bag" not in graph
    torch.testing.assert_close(traced(value, locations, weights),
                               ms_deform_attn(value, shapes, locations, weights, impl="grid_sample"))


@pytest.mark.parametrize("n_q", [0, 1])
def test_no_or_one_query(n_q):
    shapes = SHAPES["odd"]
    grads = []
    for impl in ("gather", "grid_sample"):
        inputs = make_inputs(shapes, torch.float64, n_q=n_q, seed=9)
        out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl=impl)
        assert out.shape == (2, n_q, 15)
        grads.append(torch.autograd.grad(out.sum(), inputs))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_auto_takes_grid_sample_under_torch_compile():
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, seed=10))
    compiled = torch.compile(lambda v, l, w: ms_deform_attn(v, shapes, l, w), backend="eager", fullgraph=True)
    out = compiled(value, locations, weights)
    assert torch.equal(out, ms_deform_attn(value, shapes, locations, weights, impl="grid_sample"))
    assert not torch.equal(out, ms_deform_attn(value, shapes, locations, weights, impl="gather"))


def test_auto_takes_grid_sample_under_torch_export():
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, seed=11))

    class Attention(torch.nn.Module):
        def forward(self, v, l, w):
            return ms_deform_attn(v, shapes, l, w)

    program = torch.export.export(Attention(), (value, locations, weights), strict=False)  # as istr.export does
    graph = str(program.graph)
    assert "grid_sampler" in graph and "embedding_bag" not in graph


def test_gather_rejects_what_grid_sample_rejects():
    value, locations, weights = (t.detach() for t in make_inputs(SHAPES["odd"], torch.float64))
    with pytest.raises(ValueError, match=r"expected S = sum\(H_l \* W_l\)"):
        ms_deform_attn(value, [(5, 7), (3, 4), (1, 4)], locations, weights, impl="gather")
    with pytest.raises(ValueError, match=r"attention_weights: expected \[N, Lq, M, L, P\]"):
        ms_deform_attn(value, SHAPES["odd"], locations, weights[..., :1], impl="gather")


def test_gather_under_bf16_autocast_matches_grid_sample_loosely():
    shapes = SHAPES["odd"]
    value, locations, weights = (t.detach() for t in make_inputs(shapes, torch.float32, n_q=50, seed=8))
    results = []
    for impl in ("gather", "grid_sample"):
        inputs = [value.to(torch.bfloat16).requires_grad_(), locations.clone().requires_grad_(),
                  weights.clone().requires_grad_()]  # as MSDA gets them under autocast: value bf16, the rest fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], impl=impl)
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        results.append([out.float()] + [g.float() for g in grads])
    for name, got, want in zip(("out", "value", "sampling_locations", "attention_weights"), *results):
        assert torch.isfinite(got).all()
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=0.05 * scale, msg=lambda m, name=name: f"{name}: {m}")
