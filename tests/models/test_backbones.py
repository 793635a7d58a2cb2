"""Backbones: timm feature levels by stride, FPN output, frozen BN, freeze_at, local checkpoints, ISTR on each."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import istr
from istr.models import Backbone, freeze_batch_norm

X = torch.rand(1, 3, 64, 96)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "convnext_atto", "efficientnet_b0"])
def test_pyramid_levels_by_stride(name):
    torch.manual_seed(0)
    bb = Backbone(name, out_channels=16).eval()
    info = bb.body.feature_info
    assert [info.reduction()[i] for i in bb.level_indices] == [4, 8, 16, 32]
    assert bb.in_channels == [info.channels()[i] for i in bb.level_indices]
    with torch.no_grad():
        feats = bb(X)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_resnet_channels_are_read_from_feature_info():
    assert Backbone("resnet18", out_channels=8).in_channels == [64, 128, 256, 512]
    assert Backbone("resnet50", out_channels=8).in_channels == [256, 512, 1024, 2048]
    assert Backbone("convnext_atto", out_channels=8).in_channels == [40, 80, 160, 320]  # no stride-2 level


def test_frozen_bn_matches_eval_bn_and_has_no_trainable_stats():
    torch.manual_seed(0)
    for name, kinds in (("resnet18", (nn.BatchNorm2d,)), ("efficientnet_b0", (BatchNormAct2d,))):
        body = timm.create_model(name, pretrained=False, features_only=True)
        with torch.no_grad():  # non-trivial statistics
            for m in body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
        body.eval()
        with torch.no_grad():
            expected = body(X)[-1]
            frozen = freeze_batch_norm(body)
            got = frozen(X)[-1]
        assert not any(isinstance(m, kinds) for m in frozen.modules())
        assert any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in frozen.modules())
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    bb = Backbone("resnet18", out_channels=8, frozen_bn=True)
    assert isinstance(bb.body.bn1, FrozenBatchNorm2d) and not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())


def test_frozen_bn_equals_torchvisions_bit_for_bit_forward_and_backward():
    """istr's FrozenBatchNorm2d writes its output once (the bias added in place): torchvision's values and gradients
    exactly, its state dict and its class (a subclass)."""
    from istr.models.backbone import FrozenBatchNorm2d as IstrFrozenBN

    g = torch.Generator().manual_seed(0)
    ours, theirs = IstrFrozenBN(16), FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = torch.rand(16, generator=g) + 0.5 if name == "running_var" else torch.randn(16, generator=g)
        getattr(ours, name).copy_(value)
        getattr(theirs, name).copy_(value)
    assert isinstance(ours, FrozenBatchNorm2d) and ours.state_dict().keys() == theirs.state_dict().keys()
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 16, 37, 41, generator=g, dtype=dtype)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours.to(dtype)(a), theirs.to(dtype)(b)
        assert torch.equal(out_a, out_b)
        grad = torch.randn(out_a.shape, generator=g, dtype=dtype)
        out_a.backward(grad)
        out_b.backward(grad)
        assert torch.equal(a.grad, b.grad)
        assert torch.equal(x, a.detach())  # the input is not touched


def test_freeze_at():
    bb = Backbone("resnet18", out_channels=8, freeze_at=2)
    frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"} and trainable == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for p in bb.neck.parameters())
    bb = Backbone("efficientnet_b0", out_channels=8, freeze_at=1)  # everything before the stride-4 stage
    frozen = {".".join(n.split(".")[:2]) for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem.weight", "bn1.weight", "bn1.bias", "blocks.0"}
    with pytest.raises(ValueError, match="freeze_at"):
        Backbone("resnet18", freeze_at=7)


def test_checkpoint_path_loads_local_weights(tmp_path):
    torch.manual_seed(3)
    classifier = timm.create_model("resnet18", pretrained=False)  # full model incl. fc, as timm saves it
    path = tmp_path / "r18.pth"
    torch.save(classifier.state_dict(), path)
    bb = Backbone("resnet18", out_channels=8, checkpoint_path=path)
    assert torch.equal(bb.body.conv1.weight, classifier.conv1.weight)
    assert torch.equal(bb.body.layer4[1].bn2.running_var, classifier.layer4[1].bn2.running_var)
    with pytest.raises(FileNotFoundError):
        Backbone("resnet18", checkpoint_path=tmp_path / "missing.pth")


def test_bad_backbone_names():
    with pytest.raises(ValueError, match="unknown timm model"):
        Backbone("resnet_nope")
    with pytest.raises(TypeError):
        Backbone(nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_istr_trains_and_predicts_on_other_backbones(name):
    torch.manual_seed(0)
    model = istr.create_model("istr_tiny", num_classes=2, codec=istr.create_codec("dct", mask_size=16, dim=8),
                              backbone=name, num_queries=6, num_stages=2, hidden_dim=32, dynamic_dim=8, ffn_dim=64,
                              num_heads=4, detections_per_image=5, min_size=64, max_size=96, train_min_sizes=(64,))
    images = [torch.rand(3, 64, 80)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}]
    loss = model.train()(images, targets)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[-3:])
    with torch.no_grad():
        (res,) = model.eval()(images)
    assert res["masks"].shape[1:] == (1, 64, 80) and len(res["boxes"]) <= 5
