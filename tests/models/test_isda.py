"""ISDA from the library's parts: presets, poster switches, train/eval contract, save/load, errors, shared engine."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import istr
from istr.errors import NonFiniteError
from istr.models import ISDA
from model_utils import make_batch

TINY = dict(num_queries=8, num_encoder_layers=1, num_decoder_layers=2, hidden_dim=32, num_heads=4, ffn_dim=64,
            mask_feat_dim=16, kernel_dim=32, num_groups=8, detections_per_image=10, min_size=64, max_size=96,
            train_min_sizes=(64,))


def tiny_isda(num_classes: int = 3, **overrides) -> ISDA:
    torch.manual_seed(0)
    return istr.create_model("isda_tiny", num_classes=num_classes, **{**TINY, **overrides})


def test_one_name_switches_the_family():
    assert {"isda_r50", "isda_tiny"} <= set(istr.list_models("isda*"))
    model = tiny_isda()
    assert isinstance(model, ISDA) and model.preset == "isda_tiny"
    assert model.backbone.strides == (4, 8, 16, 32, 64)  # P2..P6 from the channel mapper
    assert model.criterion.matcher.costs == {"focal": 2.0, "mask_iou": 3.0}
    assert model.criterion.losses == {"focal": 2.0, "mask_dice": 3.0}
    with pytest.raises(ValueError, match="takes no codec"):
        istr.create_model("isda_tiny", codec=istr.create_codec("dct", mask_size=16, dim=12))


def test_isda_r50_head_parameter_count():
    """Transformer 10,819,586 (6 + 6 layers, level embed, 300 x 512 query embedding, reference Linear), MFR
    1,659,392 (bias-free convs + GN, 258 inputs at P5), kernel MLP 196,862, class Linear 20,560."""
    model = istr.create_model("isda_r50", num_classes=80)
    assert sum(p.numel() for p in model.transformer.parameters()) == 10_819_586
    assert sum(p.numel() for p in model.mask_features.parameters()) == 1_659_392
    assert sum(p.numel() for p in model.head_parameters()) == 12_696_400
    print("isda_r50 head parameters:", sum(p.numel() for p in model.head_parameters()))


def _train_step(model: nn.Module) -> dict:
    model.train()
    images, targets = make_batch(model.num_classes)
    losses = model(images, targets)
    assert torch.isfinite(losses["loss"]), losses
    losses["loss"].backward()
    return losses


@pytest.mark.parametrize("options", [{}, {"mask_stride": 8}, {"mask_stride": 2}, {"mask_position": False},
                                     {"kernel_position": False}, {"mask_position": False, "kernel_position": False}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_poster_switches_build_train_and_evaluate(options):
    model = tiny_isda(**options)
    losses = _train_step(model)
    assert set(losses) == {"loss"} | {f"{t}_s{d}" for t in ("focal", "mask_dice") for d in range(2)}  # every layer
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        results = model(images)
        per_layer = model(images, all_stages=True)
    assert len(per_layer) == 2
    for res, img in zip(results, images):
        h, w = img.shape[1:]
        n = len(res["scores"])
        assert n <= 10 and res["masks"].shape == (n, 1, h, w) and res["boxes"].shape == (n, 4)
        assert set(res["masks"].unique().tolist()) <= {0.0, 1.0}
        assert (res["scores"][:-1] >= res["scores"][1:]).all()
        b, m = res["boxes"], res["masks"][:, 0].bool()
        for k in range(n):  # boxes are the masks' tight boxes
            ys, xs = torch.nonzero(m[k], as_tuple=True)
            assert b[k].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_mask_stride_sets_the_mask_logits_grid():
    for stride in (8, 4, 2):
        model = tiny_isda(mask_stride=stride).eval()
        batch = torch.rand(1, 3, 64, 96)
        mfr = model.mask_features(model.backbone(batch)[:4])
        assert mfr.shape[-2:] == (64 // stride, 96 // stride)


def test_save_load_reproduces_outputs_exactly(tmp_path):
    model = tiny_isda(mask_stride=8, kernel_position=False)
    _train_step(model)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        before = model(images, all_stages=True)
    istr.save_model(model, tmp_path / "isda.safetensors")
    loaded = istr.load_model(tmp_path / "isda.safetensors")
    assert type(loaded) is ISDA and loaded.config() == model.config() and not loaded.training
    with torch.no_grad():
        after = loaded(images, all_stages=True)
    for layer_a, layer_b in zip(before, after):
        for ra, rb in zip(layer_a, layer_b):
            assert all(torch.equal(ra[k], rb[k]) for k in ra)
    with pytest.raises(TypeError, match="'isda' model"):
        istr.load_model(tmp_path / "isda.safetensors", model=istr.create_model(
            "istr_tiny", num_classes=3, codec=istr.create_codec("dct", mask_size=16, dim=12)))


def test_bad_input_gets_the_same_clear_errors_as_istr():
    model = tiny_isda().train()
    images, targets = make_batch()
    bad = [images[0].clone(), images[1]]
    bad[0][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"images\[0\] contains NaN"):
        model(bad, targets)
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*divide by 255"):
        model([images[0] * 255, images[1]], targets)
    with pytest.raises(ValueError, match="labels"):
        model(images, [{**targets[0], "labels": torch.tensor([0, 7])}, targets[1]])
    with pytest.raises(ValueError, match="empty or inverted"):
        model(images, [{**targets[0], "boxes": targets[0]["boxes"].flip(1)}, targets[1]])
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        model(images, targets)
    with pytest.raises(ValueError, match="strides"):
        ISDA(istr.models.Backbone("resnet18", out_channels=32), num_classes=3, hidden_dim=32)


class ToyModel(nn.Module):
    """A third model family defined outside the package: one mask logit map per class, no matching at all."""

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes, self.width, self.categories = num_classes, width, None
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1))

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "width": self.width}

    @classmethod
    def from_config(cls, config: dict) -> "ToyModel":
        return cls(**config)

    def forward(self, images, targets=None):
        logits = [self.net(img[None])[0] for img in images]  # [C, H, W] per image
        if self.training:
            loss = sum(nn.functional.binary_cross_entropy_with_logits(
                lg, torch.stack([(t["masks"][t["labels"] == c].sum(0) > 0).float() for c in range(self.num_classes)]))
                for lg, t in zip(logits, targets))
            return {"loss": loss / len(images)}
        results = []
        for lg in logits:
            masks = (lg.sigmoid() > 0.5).float()[:, None]
            results.append({"boxes": torch.zeros(self.num_classes, 4), "labels": torch.arange(self.num_classes),
                            "scores": lg.sigmoid().flatten(1).amax(1), "masks": masks})
        return results


def test_a_model_family_registered_from_outside_trains_saves_and_loads(tmp_path):
    from train_utils import datasets, make_data

    from istr.engine import TrainConfig, train

    istr.register_architecture("toy_test")(ToyModel)
    try:
        paths = make_data(tmp_path / "data", num_train=4, num_val=2)
        train_set, _ = datasets(paths)
        torch.manual_seed(0)
        model = ToyModel(num_classes=train_set.num_classes)
        cfg = TrainConfig(lr=1e-2, batch_size=2, max_iters=3, warmup_iters=0, checkpoint_every=2, progress=False,
                          device="cpu", eval_at_end=False)
        result = train(model, train_set, cfg, out_dir=tmp_path / "run")
        assert result.iterations == 3 and model.categories[0] == {"id": 1, "name": "ellipse"}
        loaded = istr.load_model(result.model_path)
        assert isinstance(loaded, ToyModel) and loaded.categories == model.categories
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        resumed = train(ToyModel(num_classes=train_set.num_classes), train_set,
                        TrainConfig(**{**cfg.__dict__, "max_iters": 4}), out_dir=tmp_path / "run", resume=True)
        assert resumed.iterations == 4
        log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]
    finally:
        istr.io.ARCHITECTURES.unregister("toy_test")


def test_mask_roi_class_option_trains_infers_and_round_trips(tmp_path):
    """mask_roi_class (the demo's ISDA; not in the paper): class logits from the MFR inside each query's own mask.
    Its last layer starts at zero bias, so the untrained logits are the query's own plus the MLP's; it trains, infers
    and saves/loads like the rest, and its export is refused with a clear error."""
    images, targets = make_batch()
    torch.manual_seed(0)
    model = tiny_isda(mask_roi_class=True)
    assert model.mask_class is not None and "mask_class.mlp.3.weight" in model.state_dict()
    losses = model(images, targets)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.mask_class.mlp[1].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        results = model(images)
    assert len(results) == 2 and all(set(r) == {"boxes", "labels", "scores", "masks"} for r in results)
    istr.save_model(model, tmp_path / "m.safetensors")
    loaded = istr.load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        again = loaded(images)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(results, again))
    with pytest.raises(NotImplementedError, match="mask_roi_class"):
        model.export_head().infer(torch.zeros(1, 3, 64, 64), torch.tensor([[64, 64]]))
    finer = tiny_isda(mask_roi_class=True, mask_roi_size=14)  # the RoIAlign grid's side is an option
    assert finer.mask_class.mlp[1].in_features == 32 * 14 * 14
    assert torch.isfinite(finer(images, targets)["loss"])
    with pytest.raises(ValueError, match="mask_roi_size"):
        tiny_isda(mask_roi_class=True, mask_roi_size=0)


def test_eval_mode_runs_with_autograd_enabled():
    """Inference without torch.no_grad (as a user may call it) gives the results no_grad gives, to float rounding
    (under no_grad the decoder projects after sampling); the masks are thresholded outputs and carry no gradient."""
    images, _ = make_batch()
    model = tiny_isda(mask_roi_class=True).eval()
    with torch.no_grad():
        expected = model(images)
    results = model(images)
    for a, b in zip(results, expected):
        assert torch.equal(a["labels"], b["labels"]) and not a["masks"].requires_grad
        torch.testing.assert_close(a["scores"].detach(), b["scores"], rtol=1e-5, atol=1e-7)
        assert (a["masks"] != b["masks"]).float().mean() < 1e-3  # a pixel at 0.5 +- rounding may flip


def test_losses_compose_with_a_mask_bce_term_and_round_trip(tmp_path):
    """A user's ISDA variant in one dict: the authors' focal + dice plus per-pixel BCE on every decoder layer; the
    saved file remembers the losses."""
    losses = {"focal": 2.0, "mask_dice": 3.0, "mask_bce": 2.0}
    model = tiny_isda(losses=losses)
    assert model.criterion.losses == losses
    out = _train_step(model)
    assert {f"mask_bce_s{d}" for d in range(2)} <= set(out) and float(out["mask_bce_s1"]) > 0
    istr.save_model(model, tmp_path / "m.safetensors")
    assert istr.load_model(tmp_path / "m.safetensors").criterion.losses == losses


def test_mask_roi_class_gt_teaches_the_classifier_on_target_masks():
    """mask_roi_class_gt adds a focal term of the MaskRoIClassifier on every target mask: equal to an independent
    computation of that term, zero (and connected) for a batch without objects, refused without mask_roi_class."""
    from torchvision.ops import sigmoid_focal_loss

    from istr.models.isda.targets import mask_targets

    images, targets = make_batch()
    model = tiny_isda(mask_roi_class=True, mask_roi_class_gt=2.0)
    losses = model(images, targets)
    assert float(losses["roi_class_gt"]) > 0
    base = tiny_isda(mask_roi_class=True)
    plain = base(images, targets)
    assert torch.allclose(losses["loss"] - losses["roi_class_gt"], plain["loss"], atol=1e-5)
    # the term by hand: each target mask on the MFR's grid, as 0/1 probabilities, through the same classifier
    batch, sizes = model.transform(images)
    with torch.no_grad():
        mfr = model.mask_features(model.backbone(batch)[:4])
    want, n = 0.0, 0
    for i, t in enumerate(mask_targets(targets, sizes, tuple(batch.shape[-2:]), model.mask_stride, "cpu")):
        for mask, label in zip(t["masks"], t["labels"]):
            logits = model.mask_class((mask * 40 - 20)[None, None, None], mfr[i : i + 1])[0, 0, 0].detach()
            want += float(sigmoid_focal_loss(logits, torch.nn.functional.one_hot(label, model.num_classes).float(),
                                             reduction="sum"))
            n += 1
    assert float(losses["roi_class_gt"]) == pytest.approx(2.0 * want / n, rel=1e-4)
    empty = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0], "masks": t["masks"][:0]} for t in targets]
    zero = model(images, empty)
    assert float(zero["roi_class_gt"]) == 0.0
    zero["loss"].backward()
    assert model.mask_class.mlp[-1].weight.grad is not None
    with pytest.raises(ValueError, match="mask_roi_class_gt"):
        tiny_isda(mask_roi_class_gt=1.0)


def test_first_level_2_feeds_the_transformer_p2_to_p5(tmp_path):
    """first_level=2 (an option): the encoder's token count is that of P2..P5, training and inference work, and the
    option survives a save/load; anything but 2 or 3 is refused."""
    model = tiny_isda(first_level=2)
    seen = []
    model.transformer.register_forward_pre_hook(lambda mod, args: seen.append([tuple(f.shape[-2:]) for f in args[0]]))
    _train_step(model)
    assert seen[0] == [(24, 24), (12, 12), (6, 6), (3, 3)]  # the batch pads to 96 x 96: strides 4..32, not 8..64
    model.eval()
    with torch.no_grad():
        assert len(model(make_batch()[0])) == 2
    istr.save_model(model, tmp_path / "m.safetensors")
    assert istr.load_model(tmp_path / "m.safetensors").first_level == 2
    with pytest.raises(ValueError, match="first_level"):
        tiny_isda(first_level=4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mask_roi_features_equal_torchvision_roi_align(dtype, tol):
    """mask_roi_features (the library's RoIAlign over the MFR) against torchvision's roi_align of each mask's tight box
    (the whole map for an empty mask) times the aligned soft mask: values and MFR gradients, with a leading layer
    dimension as in training."""
    from torchvision.ops import roi_align

    from istr.models.isda.heads import mask_roi_features

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 24, 20, dtype=dtype) * 3  # [layers, images, queries, h, w]
    logits[:, :, 0] = -10.0  # empty masks
    mfr = torch.randn(3, 16, 24, 20, dtype=dtype, requires_grad=True)
    probs = logits.sigmoid().reshape(-1, 24, 20)
    boxes = []
    for p in probs >= 0.5:
        ys, xs = torch.nonzero(p, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [0, 0, 20, 24])
    boxes = torch.tensor(boxes, dtype=dtype)
    index = torch.arange(len(boxes), dtype=dtype)[:, None]
    expected = roi_align(mfr, torch.cat([index // 5 % 3, boxes], 1), 7, 1.0, 2, aligned=True) * roi_align(
        probs[:, None], torch.cat([index, boxes], 1), 7, 1.0, 2, aligned=True)
    got = mask_roi_features(logits, mfr)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, mfr, grad)[0], torch.autograd.grad(expected, mfr, grad)[0],
                               rtol=tol, atol=tol)


def test_mask_centroids_against_a_hand_computation():
    """A mask's centroid: pixels of probability >= 0.5 weighted by it, as a fraction of the valid extent; an empty
    mask keeps its fallback point."""
    from istr.models.isda.heads import mask_centroids

    probs = torch.full((1, 2, 4, 6), 0.1, dtype=torch.float64)
    probs[0, 0, 1, 2], probs[0, 0, 2, 4] = 0.6, 0.9  # pixel centres (2.5, 1.5) and (4.5, 2.5) on a 6 x 4 grid
    fallback = torch.tensor([[[0.3, 0.7], [0.2, 0.4]]], dtype=torch.float64)
    ratios = torch.tensor([[0.75, 1.0]], dtype=torch.float64)  # the image covers 3/4 of the padded width
    points = mask_centroids(torch.logit(probs), fallback, ratios)
    x = (0.6 * 2.5 + 0.9 * 4.5) / 1.5 / 6 / 0.75
    y = (0.6 * 1.5 + 0.9 * 2.5) / 1.5 / 4
    torch.testing.assert_close(points[0, 0], torch.tensor([x, y], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(points[0, 1], fallback[0, 1], rtol=0, atol=0)


@pytest.mark.parametrize("options", [{"mask_feedback": True}, {"mask_reference": True},
                                     {"mask_feedback": True, "mask_reference": True, "mask_roi_class": True},
                                     {"mask_image_channels": 8, "mask_stride": 2}, {"mask_image_channels": 16}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_mask_feedback_mask_reference_and_image_branch_options(options, tmp_path):
    """Options not in ISDA: the second layer samples around the first layer's mask centroids (mask_reference), the
    queries get their masks' features (mask_feedback, starting as the identity but for a LayerNorm and learning),
    the MFR gets an image branch at the mask stride (mask_image_channels); training and inference work, and a
    save/load reproduces the outputs."""
    model = tiny_isda(**options)
    seen = []
    for layer in model.transformer.decoder:
        layer.cross_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    losses = _train_step(model)
    assert set(losses) == {"loss"} | {f"{t}_s{d}" for t in ("focal", "mask_dice") for d in range(2)}
    moved = not torch.equal(seen[0], seen[1])  # the points the two layers sampled around
    assert moved == options.get("mask_reference", False)
    if "mask_feedback" in options:
        assert model.mask_feedback.mlp[-1].weight.grad.abs().sum() > 0
    if "mask_image_channels" in options:
        branch = model.mask_features.image_branch
        assert len(branch) == {2: 1, 4: 2}[model.mask_stride] and branch[0][0].weight.grad.abs().sum() > 0
        assert model.mask_features.fuse[0].in_channels == 16 + options["mask_image_channels"]
    model.eval()
    images, _ = make_batch()
    with torch.no_grad():
        before = model(images)
        assert len(model(images, all_stages=True)) == 2
    istr.save_model(model, tmp_path / "m.safetensors")
    loaded = istr.load_model(tmp_path / "m.safetensors").eval()
    assert loaded.mask_reference == model.mask_reference and (loaded.mask_feedback is None) == (model.mask_feedback is None)
    with torch.no_grad():
        after = loaded(images)
    for a, b in zip(before, after):
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=0)


def test_the_isda_demo_runs_with_its_settings(tmp_path):
    """`istr demo --model isda_tiny` in miniature: the demo's ISDA (masks at stride 2 with an image branch, the
    mask-RoI class term, masks fed back between decoder layers) trains, evaluates and reports what it is."""
    from istr.demo import run_demo

    report = run_demo(tmp_path / "demo", model="isda_tiny", iters=4, num_train=8, num_val=4, image_size=64, threads=1,
                      progress=False, overlays=1)
    model = istr.load_model(tmp_path / "demo" / "model.safetensors")
    assert (model.mask_stride, model.mask_features.image_branch is not None, model.mask_class is not None,
            model.mask_feedback is not None, model.mask_reference) == (2, True, True, True, True)
    assert report["iterations"] == 4 and 0.0 <= report["metrics"]["segm"]["AP"] <= 1.0
    assert "masks at stride 2 with an image branch" in (tmp_path / "demo" / "report.md").read_text()
