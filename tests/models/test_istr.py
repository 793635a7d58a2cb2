"""ISTR model: train/eval contract, ablation options, initialisation, box decoding, RoI levels, bad inputs, zoo."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from istr.ops.roi_align import PyramidTable

import istr
from istr.codecs import NotFittedError
from istr.models import ISTR, Backbone, ImageTransform, ISTRStage, apply_box_deltas, create_model, list_models, multiscale_roi_align
from istr.models.istr.head import BOX_DELTA_CLAMP, DynamicInteraction
from model_utils import TINY, check_results, make_batch, tiny_model

def train_step(model: ISTR, empty: bool = False) -> dict:
    model.train()
    images, targets = make_batch(model.num_classes, empty)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss"]), losses
    losses["loss"].backward()
    return losses


def test_train_forward_backward_and_loss_keys():
    model = tiny_model()
    losses = train_step(model)
    for term in istr.losses.DEFAULT_LOSSES:
        for stage in range(2):
            assert f"{term}_s{stage}" in losses
    total = sum(v for k, v in losses.items() if k != "loss")
    assert torch.allclose(losses["loss"].detach(), total, rtol=1e-5)
    assert model.query_boxes.grad is not None and model.query_boxes.grad.abs().sum() > 0
    assert model.position_embeddings.grad.abs().sum() > 0
    for stage in model.stages:
        assert stage.interaction.generator.weight.grad.abs().sum() > 0
        assert stage.mask_branch[-1].weight.grad.abs().sum() > 0
    assert model.backbone.neck.layer_blocks[0][0].weight.grad.abs().sum() > 0


def test_images_without_targets_give_finite_losses():
    model = tiny_model()
    losses = train_step(model, empty=True)
    assert losses["loss"].item() > 0  # the focal term still pushes every logit down
    images, targets = make_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 72, 56, dtype=torch.uint8)}
    model.zero_grad()
    loss = model(images, targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()


def test_eval_output_contract_and_all_stages():
    model = tiny_model().eval()
    images, _ = make_batch()
    with torch.no_grad():
        results = model(images)
        per_stage = model(images, all_stages=True)
    check_results(results, images, 10)
    assert len(per_stage) == 2
    for stage_results in per_stage:
        check_results(stage_results, images, 10)
    for a, b in zip(per_stage[-1], results):
        for key in a:
            assert torch.equal(a[key], b[key])
    # stage 0 and the last stage differ (independent weights, refined boxes)
    assert not torch.equal(per_stage[0][0]["boxes"], per_stage[1][0]["boxes"])


def test_only_last_stage_runs_the_mask_branch_at_inference():
    model = tiny_model(num_stages=3)
    calls = [0, 0, 0]
    for i, stage in enumerate(model.stages):
        stage.mask_branch.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.eval()
    images = make_batch()[0]
    groups = len(model.transform.same_size_groups(images))  # the two images differ in size: run apart
    with torch.no_grad():
        model(images)
    assert groups == 2 and calls == [0, 0, groups]
    train_step(model)
    assert calls == [1, 1, groups + 1]


def test_boxes_detached_between_stages_queries_not():
    model = tiny_model().train()
    images, _ = make_batch()
    batch, sizes = model.transform(images)
    feats = model.backbone(batch)
    outs, _ = model._run_stages(feats, PyramidTable(feats, model.strides), sizes, with_masks=True)
    outs[1]["boxes"].sum().backward(retain_graph=True)
    assert model.stages[0].box_branch[-1].weight.grad is None  # no path through stage 1's input boxes
    assert model.stages[0].ffn[0].weight.grad.abs().sum() > 0  # query features flow on
    assert model.stages[1].box_branch[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [
    {"attention": "multihead"},
    {"image_pool": "max"},
    {"image_pool": None},
    {"position_embedding": False},
    {"mask_head": "roi_conv", "mask_roi_size": 8},
    {"stage_logit_average": True, "num_stages": 3},
    {"codec": "identity"},
    {"mask_threshold": 0.5},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_ablation_options_train_and_eval(options):
    options = dict(options)
    if options.pop("codec", None) == "identity":  # Table 1a: the raw 28x28 mask, l = 784
        options["codec"] = istr.create_codec("identity", mask_size=28)
    model = tiny_model(**options)
    if "codec" in options:
        assert model.stages[0].mask_branch[-1].out_features == 784
    if options.get("position_embedding") is False:
        assert model.position_embeddings is None
    train_step(model)
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        results = model(images)
    check_results(results, images, 10)
    if options.get("mask_threshold") is not None:
        assert set(results[0]["masks"].unique().tolist()) <= {0.0, 1.0}


def test_stage_logit_average_changes_scores_only():
    model = tiny_model(num_stages=4).eval()
    with torch.no_grad():  # zero box deltas: boxes stay the whole image, so no detection is dropped
        for stage in model.stages:
            stage.box_branch[-1].weight.zero_()
            stage.box_branch[-1].bias.zero_()
    images = make_batch()[0][:1]  # one image: the reference below runs the stages on exactly its batch
    with torch.no_grad():
        last = model(images)
        model.stage_logit_average = True
        averaged = model(images)
        batch, sizes = model.transform(images)
        feats = model.backbone(batch)
        outs, _ = model._run_stages(feats, PyramidTable(feats, model.strides), sizes, with_masks=False)
    expected = torch.stack([o["logits"] for o in outs[2:]]).mean(0).sigmoid().flatten(1).topk(10).values
    assert torch.allclose(averaged[0]["scores"], expected[0])
    assert not torch.allclose(last[0]["scores"], averaged[0]["scores"])


def test_initialisation_class_bias_explicit_and_independent_stages():
    # C = 4 would trip the original shape heuristic (box-delta bias has last dim 4); here only the class bias moves
    model = tiny_model(num_classes=4)
    prior = -math.log((1 - 0.01) / 0.01)
    for stage in model.stages:
        assert torch.allclose(stage.class_branch[-1].bias, torch.full((4,), prior))
        assert not torch.allclose(stage.box_branch[-1].bias, torch.full((4,), prior))
    assert not torch.equal(model.stages[0].interaction.generator.weight, model.stages[1].interaction.generator.weight)
    assert torch.equal(model.query_boxes, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(8, 1))
    w = model.stages[0].ffn[0].weight  # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) + 1e-6


def test_dynamic_interaction_matches_the_reference_layout():
    # reference sec. 1.4: first d*dd generator outputs -> W1 (d x dd) row-major, next -> W2 (dd x d);
    # flatten spatial-major (index = s*d + c)
    torch.manual_seed(0)
    d, dd, s = 8, 4, 2
    layer = DynamicInteraction(d, dd, s)
    q, tokens = torch.randn(3, d), torch.randn(3, s * s, d)
    out = layer(q, tokens)
    for n in range(3):
        params = layer.generator(q[n])
        w1, w2 = params[: d * dd].view(d, dd), params[d * dd :].view(dd, d)
        h = torch.nn.functional.elu(torch.nn.functional.layer_norm(tokens[n] @ w1, (dd,), layer.norm1.weight, layer.norm1.bias))
        h = torch.nn.functional.elu(torch.nn.functional.layer_norm(h @ w2, (d,), layer.norm2.weight, layer.norm2.bias))
        flat = torch.cat([h[i] for i in range(s * s)])  # token 0's d channels, then token 1's, ...
        o = torch.nn.functional.elu(layer.norm3(layer.out(flat)))
        assert torch.allclose(out[n], o, atol=1e-5)


def test_apply_box_deltas():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    assert torch.allclose(apply_box_deltas(torch.zeros(1, 4), boxes), boxes)
    out = apply_box_deltas(torch.tensor([[2.0, -2.0, math.log(2.0), 0.0]]), boxes)  # weights (2, 2, 1, 1)
    # centre (30, 60) -> (30 + 40, 60 - 80); w 40 -> 80; h 80
    assert torch.allclose(out, torch.tensor([[30.0, -60.0, 110.0, 20.0]]))
    huge = apply_box_deltas(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), boxes)
    assert torch.allclose(huge[0, 2] - huge[0, 0], torch.tensor(40.0 * math.exp(BOX_DELTA_CLAMP)), rtol=1e-4)


def test_multiscale_roi_align_picks_the_fpn_level():
    torch.manual_seed(0)
    feats = [torch.randn(1, 4, 256 // s, 256 // s) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 256.0, 256.0], [10.0, 10.0, 122.0, 122.0],
                           [-100.0, -100.0, 400.0, 400.0]]])
    out = multiscale_roi_align(feats, boxes, 7)
    # level = floor(4 + log2(sqrt(area) / 224)) in [2, 5]: 30 -> P2, 256 -> P4, 112 -> P3, 500 -> P5
    for i, (level, stride) in enumerate([(0, 4), (2, 16), (1, 8), (3, 32)]):
        rois = torch.cat([torch.zeros(1, 1), boxes[0, i : i + 1]], 1)
        expected = roi_align(feats[level], rois, 7, 1.0 / stride, 2, aligned=True)
        assert torch.allclose(out[i : i + 1], expected)


def test_transform_resize_pad_normalise():
    tf = ImageTransform(min_size=64, max_size=100, train_min_sizes=(32, 48))
    images = [torch.full((3, 40, 80), 0.5), torch.full((3, 30, 30), 0.5)]
    batch, sizes = tf.eval()(images)
    assert sizes == [(50, 100), (64, 64)]  # 40x80 is capped by max_size
    assert batch.shape == (2, 3, 64, 128)
    expected = (0.5 - tf.mean[:, 0, 0]) / tf.std[:, 0, 0]
    assert torch.allclose(batch[0, :, 10, 10], expected) and torch.equal(batch[0, :, 50:], torch.zeros(3, 14, 128))
    tf.train()
    seen = {tf(images[1:])[1][0] for _ in range(20)}
    assert seen == {(32, 32), (48, 48)}
    boxes = torch.tensor([[8.0, 4.0, 40.0, 20.0]])
    assert torch.allclose(tf.scale_boxes(boxes, (40, 80), (50, 100)), boxes * 1.25)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model().train()
    images, targets = make_batch()
    with pytest.raises(TypeError, match="float"):
        model([(img * 255).to(torch.uint8) for img in images], targets)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model([img[:1] for img in images], targets)
    with pytest.raises(TypeError, match="list"):
        model("not images", targets)
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    bad = [dict(t) for t in targets]
    bad[0]["boxes"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"boxes.*\[N, 4\]"):
        model(images, bad)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(images, bad)
    bad = [dict(t) for t in targets]
    bad[0]["masks"] = torch.zeros(2, 61, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match="image's size"):
        model(images, bad)
    with pytest.raises(ValueError, match="one dict per image"):
        model(images, targets[:1])
    with pytest.raises(ValueError, match="all_stages"):
        model(images, targets, all_stages=True)


def test_codec_checks():
    with pytest.raises(ValueError, match="mask_dim=20.*l=12"):
        tiny_model(mask_dim=20)
    with pytest.raises(TypeError, match="MaskCodec"):
        ISTR(Backbone("resnet18", out_channels=32), codec="pca", hidden_dim=32)
    with pytest.raises(ValueError, match="hidden_dim"):
        ISTR(Backbone("resnet18", out_channels=64), istr.create_codec("dct", mask_size=16, dim=12), hidden_dim=32)
    with pytest.raises(ValueError, match="all zero"):
        tiny_model(image_pool=None, position_embedding=False)
    model = tiny_model(codec=istr.create_codec("pca", mask_size=16, dim=12))  # unfitted: builds, refuses to run
    images, targets = make_batch()
    with pytest.raises(NotFittedError, match="fit"):
        model.train()(images, targets)
    with pytest.raises(NotFittedError, match="fit"):
        model.eval()(images)
    grids = torch.rand(64, 16, 16).round()
    model.codec.fit(grids)
    with torch.no_grad():
        check_results(model(images), images, 10)


def test_codec_stays_in_eval_mode():
    model = tiny_model(codec=istr.create_codec("autoencoder", mask_size=16, dim=12)).train()
    assert model.training and not model.codec.training


def test_head_parameter_count_of_the_paper_model():
    model = create_model("istr_r50_fpn_pca60")
    head = sum(p.numel() for p in model.head_parameters())
    print(f"istr_r50_fpn_pca60 head parameters (all but backbone + FPN, C=80): {head:,}")
    assert abs(head - 81_564_432) <= 0.01 * 81_564_432
    assert sum(p.numel() for p in model.backbone.neck.parameters()) == 3_344_384
    assert sum(p.numel() for p in model.stages[0].parameters()) == 13_581_072
    assert isinstance(model.codec, istr.codecs.pca.PCACodec) and not model.codec.is_fitted
    assert (model.codec.mask_size, model.codec.dim, model.codec.whiten) == (28, 60, True)
    assert model.criterion.losses == istr.losses.DEFAULT_LOSSES
    assert model.criterion.matcher.costs == istr.matching.DEFAULT_COSTS
    assert not model.backbone.body.conv1.weight.requires_grad  # v1: stem + res2 frozen, FrozenBN
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert model.transform.train_min_sizes == tuple(range(480, 801, 32)) and model.transform.max_size == 1333


def test_v2_stage_parameter_count():
    # reference sec. 8: a v2 stage (RoI-conv mask head, 256-d DCT/PCA embedding) has 18,677,716 parameters
    stage = ISTRStage(80, 256, mask_head="roi_conv")
    assert sum(p.numel() for p in stage.parameters()) == 18_677_716


def test_zoo_registry_presets_and_overrides():
    assert {"istr_r50_fpn_pca60", "istr_r101_fpn_pca60", "istr_r50_fpn_dct60", "istr_r50_fpn_ae60",
            "istr_tiny"} <= set(list_models())
    assert list_models("istr_r101*") == ["istr_r101_fpn_pca60"]
    assert istr.list_models is list_models
    with pytest.raises(KeyError, match="istr_tiny"):
        create_model("istr_nope")
    for name, kind in (("istr_r50_fpn_dct60", "dct"), ("istr_r50_fpn_ae60", "autoencoder")):
        model = create_model(name, num_classes=2, **TINY)  # the small settings keep this cheap
        assert model.codec.codec_name == kind and (model.codec.mask_size, model.codec.dim) == (28, 60)
        assert model.preset == name and model.backbone.name == "resnet18"
    model = create_model("istr_tiny", num_classes=2, costs={"focal": 1, "l1": 1}, losses={"focal": 1, "giou": 3},
                         codec_config={"mask_size": 16, "dim": 8}, **TINY)
    assert model.criterion.matcher.costs == {"focal": 1.0, "l1": 1.0}
    assert model.criterion.losses == {"focal": 1.0, "giou": 3.0}
    assert model.codec.dim == 8 and model.stages[0].mask_branch[-1].out_features == 8
    criterion = istr.losses.SetCriterion(istr.matching.HungarianMatcher(), num_classes=2)
    assert tiny_model(2, criterion=criterion).criterion is criterion
    with pytest.raises(ValueError, match="either criterion"):
        tiny_model(2, criterion=criterion, costs={"focal": 1})
