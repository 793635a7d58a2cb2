"""ISDA building blocks: the MSDA core op against a naive bilinear loop, the MSDA module, the deformable transformer
(shapes, query-only reference points, invariance to padding), the mask feature head and the kernel head."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from istr.models.isda import deformable
from istr.models.isda.deformable import (DeformableDecoderLayer, DeformableEncoderLayer, DeformableTransformer,
                                         MultiScaleDeformableAttention, encoder_reference_points, level_masks,
                                         sine_position_encoding, valid_ratios)
from istr.models.isda.heads import KernelHead, MaskFeatureHead, coordinate_channels, mask_logits
from istr.ops.deform_attn import ms_deform_attn


# ---------------------------------------------------------------------------------------------- core op

def naive_ms_deform_attn(value, shapes, locations, weights):
    """One bilinear sample at a time: pixel (x * W - 0.5, y * H - 0.5), corners outside the map read 0."""
    n_img, _, num_heads, dim = value.shape
    _, n_q, _, num_levels, num_points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:l]) for l in range(num_levels)]
    rows = []
    for n in range(n_img):
        for q in range(n_q):
            heads = []
            for m in range(num_heads):
                acc = value.new_zeros(dim)
                for l, (h, w) in enumerate(shapes):
                    for p in range(num_points):
                        x = locations[n, q, m, l, p, 0] * w - 0.5
                        y = locations[n, q, m, l, p, 1] * h - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        fx, fy = x - x0, y - y0
                        for dy, wy in ((0, 1 - fy), (1, fy)):
                            for dx, wx in ((0, 1 - fx), (1, fx)):
                                yi, xi = y0 + dy, x0 + dx
                                if 0 <= yi < h and 0 <= xi < w:
                                    acc = acc + weights[n, q, m, l, p] * wy * wx * value[n, starts[l] + yi * w + xi, m]
                heads.append(acc)
            rows.append(torch.cat(heads))
    return torch.stack(rows).view(n_img, n_q, num_heads * dim)


def random_inputs(shapes, n=2, n_q=3, num_heads=2, dim=3, num_points=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, num_levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(n, s, num_heads, dim, generator=g, dtype=torch.float64)
    # locations in [-0.3, 1.3]: some samples straddle or leave the map
    locations = torch.rand(n, n_q, num_heads, num_levels, num_points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(n, n_q, num_heads, num_levels * num_points, generator=g, dtype=torch.float64).softmax(-1)
    weights = weights.view(n, n_q, num_heads, num_levels, num_points)
    return [t.requires_grad_() for t in (value, locations, weights)]


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4)], [(1, 1), (2, 3), (4, 4), (6, 5)]])
def test_core_op_matches_naive_loop_values_and_gradients(shapes):
    inputs = random_inputs(shapes)
    out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2])
    expected = naive_ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2])
    assert out.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


def test_core_op_accepts_tensor_shapes_and_some_locations_leave_the_map():
    shapes = [(5, 7), (3, 4)]
    inputs = random_inputs(shapes, seed=1)
    assert ((inputs[1] < 0) | (inputs[1] > 1)).any()
    out = ms_deform_attn(inputs[0], torch.tensor(shapes), inputs[1], inputs[2])
    torch.testing.assert_close(out, ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2]), rtol=0, atol=0)


def test_core_op_gradcheck():
    shapes = [(2, 3), (1, 2)]
    inputs = random_inputs(shapes, n=1, n_q=2, num_heads=2, dim=2, num_points=2, seed=2)
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), inputs)


def test_core_op_rejects_mismatched_shapes():
    value, locations, weights = (t.detach() for t in random_inputs([(5, 7), (3, 4)]))
    with pytest.raises(ValueError, match=r"expected S = sum\(H_l \* W_l\) = 50"):
        ms_deform_attn(value, [(5, 7), (3, 5)], locations, weights)
    with pytest.raises(ValueError, match=r"sampling_locations: expected \[N=2, Lq, M=2, L=3"):
        ms_deform_attn(value, [(5, 7), (3, 3), (1, 3)], locations, weights)
    with pytest.raises(ValueError, match=r"attention_weights: expected \[N, Lq, M, L, P\]"):
        ms_deform_attn(value, [(5, 7), (3, 4)], locations, weights[..., :1])
    with pytest.raises(ValueError, match=r"value: expected \[N, S, M, D\]"):
        ms_deform_attn(value.flatten(2), [(5, 7), (3, 4)], locations, weights)
    with pytest.raises(TypeError, match="integer tensor"):
        ms_deform_attn(value, torch.tensor([[5.0, 7.0], [3.0, 4.0]]), locations, weights)


# ---------------------------------------------------------------------------------------------- MSDA module

def test_msda_init_uniform_weights_and_ray_offsets():
    torch.manual_seed(0)
    shapes = [(6, 10), (3, 5), (2, 2)]
    attn = MultiScaleDeformableAttention(hidden_dim=32, num_levels=3, num_heads=8, num_points=4)
    query = torch.randn(2, 5, 32)
    ref = torch.rand(2, 5, 3, 2)
    locations, weights = attn.sample_points(query, ref, shapes)
    assert locations.shape == (2, 5, 8, 3, 4, 2) and weights.shape == (2, 5, 8, 3, 4)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 12))
    # head m points along angle 2*pi*m/8, larger component 1, point i at (i+1) x that, in pixels of every level
    rays = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32)
    expected_px = rays[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]  # [M, 1, P, 2]
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # [L, 2]
    offsets_px = (locations - ref[:, :, None, :, None, :]) * size_xy[:, None, :]
    torch.testing.assert_close(offsets_px, expected_px.expand(8, 3, 4, 2).expand(2, 5, -1, -1, -1, -1),
                               rtol=0, atol=1e-5)


def test_msda_forward_shape_padding_and_errors():
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    attn = MultiScaleDeformableAttention(hidden_dim=16, num_levels=2, num_heads=4, num_points=2)
    value_input = torch.randn(2, 26, 16)
    query, ref = torch.randn(2, 7, 16), torch.rand(2, 7, 2, 2)
    padding = torch.zeros(2, 26, dtype=torch.bool)
    padding[0, 3] = True
    out = attn(query, ref, value_input, torch.tensor(shapes), torch.tensor([0, 20]), padding)
    assert out.shape == (2, 7, 16)
    # a padded position's value never matters
    changed = value_input.clone()
    changed[0, 3] += 100.0
    torch.testing.assert_close(attn(query, ref, changed, shapes, None, padding), out)
    with pytest.raises(ValueError, match=r"level_start_index: expected \[0, 20\]"):
        attn(query, ref, value_input, shapes, [0, 19])
    with pytest.raises(ValueError, match=r"reference_points: expected \[N, Lq, L, 2\]"):
        attn(query, ref[:, :, 0], value_input, shapes)
    with pytest.raises(ValueError, match=r"value_input: expected \[N, S, C\] = \(2, 26, 16\)"):
        attn(query, ref, value_input[:, 1:], shapes)


# ---------------------------------------------------------------------------------------------- positions, masks

def test_sine_position_encoding_formula_and_padding():
    pos = sine_position_encoding((1, 3, 4), num_feats=8)
    assert pos.shape == (1, 16, 3, 4)
    i, j = 2, 1
    y = (i + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    expected = [math.sin(y), math.cos(y), math.sin(y / 10000 ** 0.25), math.cos(y / 10000 ** 0.25)]
    torch.testing.assert_close(pos[0, :4, i, j], torch.tensor(expected))
    torch.testing.assert_close(pos[0, 8:10, i, j], torch.tensor([math.sin(x), math.cos(x)]))
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[0, :3, :4] = False
    mask[1] = False
    padded = sine_position_encoding(mask, num_feats=8)
    torch.testing.assert_close(padded[0, :, :3, :4], pos[0])


def test_level_masks_valid_ratios_and_encoder_reference_points():
    masks = level_masks([(64, 40), (96, 64)], (96, 64), [(12, 8), (6, 4), (3, 2)])
    assert [tuple(m.shape) for m in masks] == [(2, 12, 8), (2, 6, 4), (2, 3, 2)]
    assert (~masks[0][0]).sum() == 8 * 5 and (~masks[1][0]).sum() == 4 * 3 and (~masks[2][0]).sum() == 2 * 2
    assert not masks[2][1].any()
    ratios = valid_ratios(masks)
    torch.testing.assert_close(ratios[0], torch.tensor([[5 / 8, 8 / 12], [3 / 4, 4 / 6], [2 / 2, 2 / 3]]))
    ref = encoder_reference_points([(12, 8), (6, 4), (3, 2)], ratios)
    assert ref.shape == (2, 96 + 24 + 6, 3, 2)
    # image 0, level 0 pixel (row 1, col 2): centre (2.5 / 5, 1.5 / 8) of the unpadded image, times each ratio
    torch.testing.assert_close(ref[0, 1 * 8 + 2], torch.tensor([2.5 / 5, 1.5 / 8]) * ratios[0])
    with pytest.raises(ValueError, match="within the padded size"):
        level_masks([(97, 10)], (96, 64), [(12, 8)])


# ---------------------------------------------------------------------------------------------- transformer

def small_transformer(**kw):
    args = dict(hidden_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=3, ffn_dim=64,
                num_levels=3, num_points=2, num_queries=7)
    args.update(kw)
    return DeformableTransformer(**args).eval()


def test_transformer_shapes_and_query_only_reference_points():
    torch.manual_seed(0)
    model = small_transformer()
    shapes = [(12, 8), (6, 4), (3, 2)]
    features = [torch.randn(2, 32, h, w) for h, w in shapes]
    masks = level_masks([(64, 40), (96, 64)], (96, 64), shapes)
    with torch.no_grad():
        hs, ref, memory = model(features, masks)
    assert hs.shape == (3, 2, 7, 32) and ref.shape == (2, 7, 2) and memory.shape == (2, 126, 32)
    assert ((ref >= 0) & (ref <= 1)).all()
    # the same for both images (they come from the query embedding alone), up to the GEMM's per-row rounding, which
    # differs between rows on some CPUs (Intel Xeon: 6e-8); content-dependent points would differ by far more
    torch.testing.assert_close(ref[0], ref[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"features: expected 3 levels, got 2"):
        model(features[:2])
    with pytest.raises(ValueError, match=r"masks\[1\]: expected bool \(2, 6, 4\)"):
        model(features, [masks[0], masks[1][:, :5], masks[2]])


def test_transformer_invariant_to_padding_when_masks_are_given():
    """Image A (64 x 40 px) alone, vs A zero-padded to 96 x 64 in a batch with a bigger image B, garbage in the
    padding: A's decoder outputs and its memory at valid positions agree to float64 round-off (atol 1e-10)."""
    torch.manual_seed(0)
    model = small_transformer().double()
    padded_shapes = [(12, 8), (6, 4), (3, 2)]
    masks = level_masks([(64, 40), (96, 64)], (96, 64), padded_shapes)
    alone_shapes = [(int((~m[0, :, 0]).sum()), int((~m[0, 0, :]).sum())) for m in masks]
    assert alone_shapes == [(8, 5), (4, 3), (2, 2)]
    alone = [torch.randn(1, 32, h, w, dtype=torch.float64) for h, w in alone_shapes]
    batch = [torch.randn(2, 32, h, w, dtype=torch.float64) * 3 for h, w in padded_shapes]  # garbage padding
    for feat, a, (h, w) in zip(batch, alone, alone_shapes):
        feat[0, :, :h, :w] = a[0]
    with torch.no_grad():
        hs_alone, ref_alone, memory_alone = model(alone)
        hs, ref, memory = model(batch, masks)
        hs_unmasked = model(batch)[0]
    torch.testing.assert_close(ref[0], ref_alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(hs[:, 0], hs_alone[:, 0], rtol=0, atol=1e-10)
    valid = ~torch.cat([m[0].flatten() for m in masks])
    torch.testing.assert_close(memory[0, valid], memory_alone[0], rtol=0, atol=1e-10)
    assert (hs_unmasked[:, 0] - hs_alone[:, 0]).abs().max() > 1e-3  # without masks the padding leaks in


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encoder_layer_inference_in_slices_equals_the_whole_layer(dtype, monkeypatch):
    """At inference (eval, no autograd, the gather formulation) an encoder layer runs a slice of tokens at a time;
    it equals the whole-layer path (taken with autograd on) on two padded images, sample points leaving the map,
    with a slice size that does not divide the tokens. Equal bit for bit on the Intel Xeon it was written on; the
    tolerance allows a BLAS whose per-row rounding depends on the number of rows."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(hidden_dim=32, num_levels=3, num_heads=4, num_points=2, ffn_dim=64).to(dtype)
    with torch.no_grad():
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.5)  # samples spread, some outside the map
        layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    layer.eval()
    shapes = [(12, 8), (6, 4), (3, 2)]
    masks = level_masks([(64, 40), (96, 64)], (96, 64), shapes)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    ref = encoder_reference_points(shapes, valid_ratios(masks, dtype))
    src, pos = torch.randn(2, 126, 32, dtype=dtype), torch.randn(2, 126, 32, dtype=dtype)
    whole = layer(src.clone().requires_grad_(), pos, ref, shapes, padding).detach()
    calls = []
    slices = deformable.DeformableEncoderLayer._forward_slices
    monkeypatch.setattr(deformable.DeformableEncoderLayer, "_forward_slices",
                        lambda self, *args: calls.append(1) or slices(self, *args))
    monkeypatch.setattr(deformable, "_ENCODER_SLICE", 7)
    with torch.no_grad():
        sliced = layer(src, pos, ref, shapes, padding)
        layer.train()
        layer(src, pos, ref, shapes, padding)  # training mode (dropout): the whole layer, even without autograd
    assert len(calls) == 1
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(sliced, whole, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_layer_inference_projects_after_sampling_with_the_same_values(dtype, monkeypatch):
    """At inference (no autograd, the gather formulation) a decoder layer's cross-attention sums its samples before
    the value projection (ms_deform_attn_projected); it equals the autograd path, padded images included."""
    torch.manual_seed(0)
    layer = DeformableDecoderLayer(hidden_dim=32, num_levels=3, num_heads=4, num_points=2, ffn_dim=64).to(dtype).eval()
    with torch.no_grad():
        layer.cross_attn.sampling_offsets.weight.normal_(0, 0.5)
        layer.cross_attn.value_proj.bias.normal_()
    shapes = [(12, 8), (6, 4), (3, 2)]
    masks = level_masks([(64, 40), (96, 64)], (96, 64), shapes)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    tgt, pos = torch.randn(2, 5, 32, dtype=dtype), torch.randn(2, 5, 32, dtype=dtype)
    memory, ref = torch.randn(2, 126, 32, dtype=dtype), torch.rand(2, 5, 3, 2, dtype=dtype)
    whole = layer(tgt.clone().requires_grad_(), pos, ref, memory, shapes, padding).detach()
    calls = []
    projected = deformable.ms_deform_attn_projected
    monkeypatch.setattr(deformable, "ms_deform_attn_projected", lambda *a: calls.append(1) or projected(*a))
    with torch.no_grad():
        got = layer(tgt, pos, ref, memory, shapes, padding)
    assert calls == [1]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, whole, **tol)


# ---------------------------------------------------------------------------------------------- ISDA heads

def test_mask_feature_head_default_widths_position_channels():
    assert MaskFeatureHead().branches[3][0][0].in_channels == 258
    assert MaskFeatureHead(mask_position=False).branches[3][0][0].in_channels == 256
    head = MaskFeatureHead(in_channels=16, feat_channels=8, out_channels=12, num_groups=4)
    assert head.branches[3][0][0].in_channels == 18 and [len(b) for b in head.branches] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="mask_stride: expected 2, 4 or 8, got 16"):
        MaskFeatureHead(mask_stride=16)
    with pytest.raises(ValueError, match="feat_channels: expected a multiple of num_groups=32, got 48"):
        MaskFeatureHead(feat_channels=48)


@pytest.mark.parametrize("mask_stride, size", [(2, (32, 48)), (4, (16, 24)), (8, (8, 12))])
@pytest.mark.parametrize("mask_position", [True, False])
def test_mask_feature_head_shapes(mask_stride, size, mask_position):
    torch.manual_seed(0)
    head = MaskFeatureHead(in_channels=16, feat_channels=8, out_channels=12, mask_stride=mask_stride,
                           mask_position=mask_position, num_groups=4)
    features = [torch.randn(2, 16, 64 // s, 96 // s) for s in (4, 8, 16, 32)]  # a 64 x 96 padded batch
    mfr = head(features)
    assert mfr.shape == (2, 12, *size)
    assert (mfr >= 0).all()  # ends in ReLU


def test_mask_feature_head_odd_sizes_and_coordinates():
    head = MaskFeatureHead(in_channels=8, feat_channels=4, out_channels=8, num_groups=2)
    features = [torch.randn(1, 8, h, w) for h, w in ((13, 17), (7, 9), (4, 5), (2, 3))]
    assert head(features).shape == (1, 8, 13, 17)
    coords = coordinate_channels(features[3])
    torch.testing.assert_close(coords[0, 0], torch.tensor([[-1.0, 0.0, 1.0]] * 2))
    torch.testing.assert_close(coords[0, 1], torch.tensor([[-1.0] * 3, [1.0] * 3]))


@pytest.mark.parametrize("kernel_position", [True, False])
def test_kernel_head_and_mask_logits(kernel_position):
    torch.manual_seed(0)
    head = KernelHead(hidden_dim=16, kernel_dim=12, kernel_position=kernel_position)
    assert head.mlp[-1].out_features == (10 if kernel_position else 12)
    hs = torch.randn(3, 2, 5, 16)  # [layers, N, Q, d]
    ref = torch.rand(2, 5, 2)
    kernels = head(hs, ref)
    assert kernels.shape == (3, 2, 5, 12)
    if kernel_position:
        torch.testing.assert_close(kernels[..., -2:], torch.logit(ref, eps=1e-5).expand(3, -1, -1, -1),
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"reference_points: expected \[N, Q, 2\] = \(2, 5, 2\)"):
            head(hs)
    mfr = torch.randn(2, 12, 6, 7)
    logits = mask_logits(kernels, mfr)
    assert logits.shape == (3, 2, 5, 6, 7)
    conv = torch.stack([F.conv2d(mfr[n:n + 1], kernels[-1, n][:, :, None, None])[0] for n in range(2)])
    torch.testing.assert_close(logits[-1], conv, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="equal N and K"):
        mask_logits(kernels, mfr[:, :11])
