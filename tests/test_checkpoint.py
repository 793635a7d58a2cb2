"""Model checkpoints: save_model/load_model round-trip outputs exactly; mismatches and wrong files fail clearly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import istr
from istr.models import ISTR

SMALL = dict(num_queries=6, num_stages=2, hidden_dim=32, dynamic_dim=8, ffn_dim=64, num_heads=4,
             detections_per_image=8, min_size=64, max_size=96, train_min_sizes=(64,))


def fitted_pca(dim: int = 10) -> istr.MaskCodec:
    g = torch.Generator().manual_seed(0)
    grids = (torch.rand(80, 16, 16, generator=g) > 0.5).float()
    return istr.create_codec("pca", mask_size=16, dim=dim, whiten=True, logit_space=True).fit(grids)


def small_model(**overrides) -> ISTR:
    torch.manual_seed(0)
    kwargs = {"codec": fitted_pca(), **SMALL, **overrides}
    return istr.create_model("istr_tiny", num_classes=3, **kwargs)


def data():
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 60, 72, generator=g), torch.rand(3, 50, 64, generator=g)]
    targets = []
    for img in images:
        h, w = img.shape[1:]
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 10:40, 12:50] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2]),
                        "masks": masks})
    return images, targets


def one_training_step(model: ISTR) -> None:
    """Changes the weights (and the BN running statistics of a roi_conv mask head) away from the init."""
    images, targets = data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()(images, targets)["loss"].backward()
    opt.step()
    with torch.no_grad():  # small box deltas: random ones push boxes out of the image (dropped at inference)
        for stage in model.stages:
            stage.box_branch[-1].weight.mul_(0.05)
            stage.box_branch[-1].bias.mul_(0.05)


def assert_same_results(a, b) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert torch.equal(ra[key], rb[key]), key


@pytest.mark.parametrize("options", [{}, {"mask_head": "roi_conv", "mask_roi_size": 8, "frozen_bn": False}],
                         ids=["query_mlp", "roi_conv"])
def test_round_trip_reproduces_outputs_exactly(tmp_path, options):
    model = small_model(**options)
    one_training_step(model)
    model.eval()
    images, _ = data()
    with torch.no_grad():
        before = model(images, all_stages=True)
    assert all(len(r["boxes"]) > 0 for stage in before for r in stage)
    path = tmp_path / "model.safetensors"
    istr.save_model(model, path)
    loaded = istr.load_model(path)
    assert not loaded.training and loaded.preset == "istr_tiny"
    assert loaded.codec.is_fitted and torch.equal(loaded.codec.components, model.codec.components)
    assert loaded.config() == model.config()
    with torch.no_grad():
        after = loaded(images, all_stages=True)
    for stage_a, stage_b in zip(before, after):
        assert_same_results(stage_a, stage_b)
    # the rebuilt criterion carries the same loss/cost weights, so the loaded model trains as the saved one
    assert loaded.criterion.losses == model.criterion.losses
    assert loaded.criterion.matcher.costs == model.criterion.matcher.costs


def test_file_holds_tensors_and_construction_args(tmp_path):
    model = small_model(backbone="resnet18", attention="multihead", image_pool="max")
    path = tmp_path / "m.safetensors"
    istr.save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "istr-model"
    config = json.loads(meta["config"])
    assert config["preset"] == "istr_tiny" and config["num_classes"] == 3
    assert config["backbone"]["name"] == "resnet18"
    assert config["codec"] == {"name": "pca", "config": model.codec.config()}
    assert config["attention"] == "multihead" and config["image_pool"] == "max"
    assert keys == set(model.state_dict())
    assert {"codec.components", "codec.mean", "codec.fitted"} <= keys


def test_loading_into_a_different_model_names_the_mismatch(tmp_path):
    path = tmp_path / "m.safetensors"
    saved = small_model()
    one_training_step(saved)
    istr.save_model(saved, path)
    same = small_model(detections_per_image=3).train()  # inference-only settings may differ
    assert istr.load_model(path, model=same) is same
    assert same.detections_per_image == 3 and same.training  # keeps its settings and mode
    for (name, a), b in zip(saved.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="num_classes: file 3 vs model 5"):
        istr.load_model(path, model=istr.create_model("istr_tiny", num_classes=5, codec=fitted_pca(), **SMALL))
    with pytest.raises(ValueError, match="num_queries"):
        istr.load_model(path, model=small_model(num_queries=7))
    with pytest.raises(ValueError, match="codec.config.dim: file 10 vs model 12"):
        istr.load_model(path, model=small_model(codec=fitted_pca(12)))
    with pytest.raises(ValueError, match="backbone.name"):
        istr.load_model(path, model=small_model(backbone="resnet34"))


def test_wrong_files_and_unsavable_models(tmp_path):
    codec_path = tmp_path / "codec.safetensors"
    fitted_pca().save(codec_path)
    with pytest.raises(ValueError, match="not an istr model"):
        istr.load_model(codec_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a model file"):
        istr.load_model(junk)
    with pytest.raises(FileNotFoundError):
        istr.load_model(tmp_path / "missing.safetensors")
    # a module of no registered architecture is saved as a plain state dict: it loads into an instance only
    linear = nn.Linear(2, 2)
    istr.save_model(linear, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not of a registered istr architecture"):
        istr.load_model(tmp_path / "x.safetensors")
    other = nn.Linear(2, 2)
    istr.load_model(tmp_path / "x.safetensors", model=other)
    assert torch.equal(other.weight, linear.weight)
    with pytest.raises(TypeError, match="Linear"):
        istr.load_model(tmp_path / "x.safetensors", model=nn.Conv2d(2, 2, 1))

    class PlainBackbone(nn.Module):
        out_channels, strides = 32, (4, 8, 16, 32)

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return [self.scale * torch.ones(x.shape[0], 32, x.shape[2] // s, x.shape[3] // s) for s in self.strides]

    def custom():
        torch.manual_seed(0)
        return ISTR(PlainBackbone(), fitted_pca(), 3, hidden_dim=32, num_queries=4, num_stages=1, dynamic_dim=8,
                    ffn_dim=64, num_heads=4)

    # a backbone without config() is saved with the weights; the file loads into a model the user builds
    saved = custom()
    with torch.no_grad():
        saved.backbone.scale.fill_(3.0)
    istr.save_model(saved, tmp_path / "custom.safetensors")
    with pytest.raises(ValueError, match="backbone has no config"):
        istr.load_model(tmp_path / "custom.safetensors")
    loaded = istr.load_model(tmp_path / "custom.safetensors", model=custom())
    assert float(loaded.backbone.scale.detach()) == 3.0


def test_load_model_takes_run_and_checkpoint_directories(tmp_path):
    from istr.engine.checkpoint import save_checkpoint

    model = small_model()
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", model, {"iteration": 3})
    from_checkpoints = istr.load_model(run)  # no run/model.safetensors yet: the newest checkpoint's
    istr.save_model(model, run / "model.safetensors")
    for path in (run, run / "checkpoints" / "iter_0000003", run / "model.safetensors"):
        loaded = istr.load_model(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert from_checkpoints.config() == model.config()
    with pytest.raises(FileNotFoundError, match="no model in the directory"):
        istr.load_model(tmp_path)
