"""ISDA as the authors initialise and train it: mask-feature convs N(0, 0.01), a channel mapper without conv bias
whose P2 conv is kaiming fan_out, the neck in the head's lr group, and the preset's recipe in the run record."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import istr
from istr.engine import TrainConfig
from istr.engine.config import resolve_config
from istr.engine.optim import param_groups
from istr.models.isda import ISDA_RECIPE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def isda_r50():
    torch.manual_seed(0)
    return istr.create_model("isda_r50", num_classes=80)


def test_mask_feature_convs_are_drawn_from_n0_001(isda_r50):
    convs = [m for m in isda_r50.mask_features.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8  # P2: 1, P3: 1, P4: 2, P5: 3, fuse: 1
    for conv in convs:
        assert abs(float(conv.weight.detach().std()) - 0.01) < 0.001, conv
        assert conv.bias is None
    default = istr.create_model("isda_tiny", num_classes=3, mask_feat_init_std=None)
    assert float(default.mask_features.fuse[0].weight.detach().std()) > 0.02  # PyTorch's init remains an option


def test_neck_has_no_conv_bias_and_p2_is_kaiming_fan_out(isda_r50):
    neck = isda_r50.backbone.neck
    convs = [m for m in neck.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    p2 = neck.lateral[0][0].weight.detach()  # [256, 256, 1, 1]: kaiming normal fan_out, std = sqrt(2 / fan_out)
    assert abs(float(p2.std()) / math.sqrt(2 / p2.shape[0]) - 1) < 0.05
    p3 = neck.lateral[1][0].weight.detach()  # xavier uniform: std = sqrt(2 / (fan_in + fan_out))
    assert abs(float(p3.std()) / math.sqrt(2 / (p3.shape[0] + p3.shape[1])) - 1) < 0.05


def test_the_neck_trains_in_the_heads_lr_group(isda_r50):
    names = isda_r50.backbone_lr_names()
    assert names and all(n.startswith("backbone.body.") for n in names)
    cfg, _ = resolve_config(TrainConfig(), isda_r50.recipe)
    groups = param_groups(isda_r50, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    neck = dict(isda_r50.named_parameters())["backbone.neck.lateral.0.1.weight"]
    trunk = next(p for n, p in isda_r50.named_parameters() if n.startswith("backbone.body.") and p.requires_grad)
    head = isda_r50.class_embed.weight
    assert lr_of[id(neck)] == lr_of[id(head)] == pytest.approx(1.25e-4)
    assert lr_of[id(trunk)] == pytest.approx(1.25e-5)


def test_the_preset_carries_the_authors_recipe_and_istr_keeps_the_library_defaults():
    assert istr.models.preset_info("isda_r50").recipe == ISDA_RECIPE
    assert ISDA_RECIPE["lr"] == 1.25e-4 and ISDA_RECIPE["backbone_lr_mult"] == 0.1
    assert ISDA_RECIPE["clip_grad_norm"] == 0.1 and ISDA_RECIPE["warmup_iters"] == 0
    assert istr.models.preset_info("istr_r50_fpn_pca60").recipe == {}


def test_older_isda_files_without_these_options_still_load(tmp_path):
    """A model file written before the authors' init (a neck with conv biases) loads: the neck's options are stored
    in the backbone config, and a config without them means PyTorch's defaults."""
    model = istr.create_model("isda_tiny", num_classes=3, neck_options={}, min_size=64, max_size=64)
    assert model.backbone.neck.lateral[0][0].bias is not None
    istr.save_model(model, tmp_path / "m.safetensors")
    loaded = istr.load_model(tmp_path / "m.safetensors")
    assert loaded.backbone.neck.lateral[0][0].bias is not None


@pytest.mark.slow
def test_istr_train_writes_the_authors_recipe_into_the_run_record(tmp_path):
    from istr.data import make_synthetic_coco

    data = tmp_path / "data"
    make_synthetic_coco(data, num_train=4, num_val=2, image_size=64, difficulty="easy", seed=0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "istr", "train", "--model", "isda_r50", "--synthetic", str(data), "--max-iters", "1",
           "--batch-size", "1", "--no-eval", "--out", str(out), "--model-arg", "min_size=64", "max_size=64",
           "train_min_sizes=[64]", "num_queries=10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    text = json.dumps(record)
    assert "isda_r50" in text
    train = record.get("train_config") or record.get("config") or record
    flat = json.dumps(train)
    for key, value in (("lr", 1.25e-4), ("backbone_lr_mult", 0.1), ("clip_grad_norm", 0.1), ("warmup_iters", 0)):
        assert f'"{key}": {json.dumps(value)}' in flat, (key, flat[:2000])
