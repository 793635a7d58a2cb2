"""TrainConfig as the one source of training options: recipe resolution (explicit > model.recipe > library default),
recorded in run.json; the backbone lr group from model.backbone_lr_names(); `istr train` flags generated from the
fields (names, types, defaults, help)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from istr.cli import build_parser, config_from_args
from istr.engine import (LIBRARY_DEFAULTS, RECIPE_FIELDS, RunDir, TrainConfig, Trainer, evaluate, predict,
                         resolve_config, results_to_coco)
from istr.engine.callbacks import ScheduleToBudget, StepTimer, TimeBudget
from train_utils import datasets, make_data, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("config") / "data", num_train=6, num_val=2)


def test_resolution_order_and_sources():
    recipe = {"lr": 1.25e-4, "clip_grad_norm": 0.1, "milestones": [5]}
    cfg, sources = resolve_config(TrainConfig(lr=3e-4, max_iters=10), recipe)
    assert (cfg.lr, cfg.clip_grad_norm, cfg.milestones, cfg.weight_decay) == (3e-4, 0.1, (5,), LIBRARY_DEFAULTS["weight_decay"])
    assert sources["lr"] == "config" and sources["clip_grad_norm"] == "recipe" and sources["weight_decay"] == "default"
    assert set(sources) == set(RECIPE_FIELDS)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        resolve_config(TrainConfig(), {"learning_rate": 1.0})
    with pytest.raises(ValueError, match=r"clip_grad_norm must be >= 0.*recipe values: \['clip_grad_norm'\]"):
        resolve_config(TrainConfig(), {"clip_grad_norm": -1.0})
    assert resolve_config(TrainConfig(clip_grad_norm=0), {"clip_grad_norm": 0.1})[0].clip_grad_norm == 0  # 0: no clip


def test_trainer_takes_the_models_recipe_and_records_it(data, tmp_path):
    train_set, _ = datasets(data)
    model = tiny_model(data["train_annotations"])
    model.recipe = {"lr": 1e-3, "backbone_lr_mult": 0.1, "warmup_iters": 0}
    model.backbone_lr_names = lambda: [n for n, _ in model.named_parameters() if n.startswith("backbone.body.")]
    user_cfg = TrainConfig(batch_size=2, max_iters=1, checkpoint_every=0, progress=False, device="cpu",
                           weight_decay=0.0)
    trainer = Trainer(model, train_set, user_cfg, out_dir=tmp_path / "run")
    assert user_cfg.lr is None  # the user's config is not changed; trainer.cfg is the resolved copy
    assert (trainer.cfg.lr, trainer.cfg.weight_decay, trainer.cfg.clip_grad_norm) == (1e-3, 0.0, 1.0)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["backbone"]["lr"] == pytest.approx(1e-4)
    # backbone_lr_names decides the group: the FPN ("backbone.fpn.*") stays with the head here
    backbone = {id(p) for p in groups["backbone"]["params"]}
    fpn = [p for n, p in model.named_parameters() if n.startswith("backbone.") and not n.startswith("backbone.body.")]
    assert fpn and not any(id(p) in backbone for p in fpn)
    trainer.train()
    record = RunDir(tmp_path / "run").read_record()
    assert record["recipe"]["values"] == model.recipe and record["config"]["lr"] == 1e-3
    assert record["config_sources"]["lr"] == "recipe" and record["config_sources"]["weight_decay"] == "config"
    assert record["train_data"]["length"] == len(train_set)


def test_every_config_field_is_a_flag_with_its_help_and_type():
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    by_dest = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
        if f.metadata.get("cli", True) is False:
            assert f.name not in by_dest
            continue
        action = by_dest[f.name]
        assert action.default is None and f.metadata["help"] in action.help
    assert "--minutes" in by_dest["max_minutes"].option_strings and "--workers" in by_dest["num_workers"].option_strings
    assert "--no-progress" in by_dest["progress"].option_strings  # the README's flags are all still there
    args = parser.parse_args(["train", "--lr", "1e-3", "--milestones", "5", "9", "--betas", "0.8", "0.9",
                              "--no-progress", "--minutes", "2", "--bf16"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.milestones, cfg.betas, cfg.progress, cfg.bf16) == (1e-3, (5, 9), (0.8, 0.9), False, True)
    assert cfg.max_minutes == 2 and cfg.max_iters is None  # a time budget alone: no step limit
    assert cfg.seed == TrainConfig().seed and cfg.weight_decay is None  # unset: TrainConfig's defaults, one place
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))  # plain values


def test_weights_and_losses_unchanged_by_the_split(data, tmp_path):
    """The resolved defaults reproduce the explicit paper recipe exactly (same losses step for step)."""
    train_set, _ = datasets(data)
    explicit = dict(lr=2.5e-5, weight_decay=1e-4, backbone_lr_mult=1.0, warmup_iters=1000, warmup_factor=0.01,
                    milestones=(210_000, 250_000), gamma=0.1, clip_grad_norm=1.0)
    losses = []
    for i, values in enumerate(({}, explicit)):
        cfg = TrainConfig(batch_size=2, max_iters=2, checkpoint_every=0, progress=False, device="cpu", log_every=1,
                          **values)
        Trainer(tiny_model(data["train_annotations"]), train_set, cfg, out_dir=tmp_path / str(i)).train()
        losses.append([r["loss"] for r in RunDir(tmp_path / str(i)).read_log() if "event" not in r])
    assert losses[0] == losses[1] and len(losses[0]) == 2 and torch.isfinite(torch.tensor(losses[0])).all()


_NET = torch.nn.Identity()


@pytest.mark.parametrize("call, text", [
    (lambda: predict(_NET, [], score_threshold=1.5), "score_threshold must be <= 1"),
    (lambda: predict(_NET, [], score_threshold=float("nan")), "score_threshold must be a finite number"),
    (lambda: predict(_NET, [], batch_size=0), "batch_size must be >= 1"),
    (lambda: evaluate(_NET, None, batch_size=1.5), "batch_size must be an int"),
    (lambda: evaluate(_NET, None, mask_threshold=float("nan")), "mask_threshold must be a finite number"),
    (lambda: evaluate(_NET, None, all_stages="False"), "all_stages must be a bool"),
    (lambda: results_to_coco([], [], [1], mask_threshold=2), "mask_threshold must be <= 1"),
    (lambda: TimeBudget(float("nan")), "minutes must be a finite number"),
    (lambda: StepTimer(calibrate=0), "calibrate must be >= 1"),
    (lambda: ScheduleToBudget(float("nan")), "decay_at must be a finite number"),
])
def test_engine_functions_check_their_numbers(call, text):
    with pytest.raises(ValueError, match=text):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_where_there_is_none_is_one_clear_error(data, tmp_path):
    train_set, _ = datasets(data)
    cfg = TrainConfig(batch_size=2, max_iters=1, progress=False, device="cuda")
    for call in (lambda: Trainer(tiny_model(data["train_annotations"]), train_set, cfg, out_dir=tmp_path / "r"),
                 lambda: evaluate(_NET, None, device="cuda"), lambda: predict(_NET, [], device="cuda:1")):
        with pytest.raises(ValueError, match="CUDA is not available on this machine; use device='cpu'"):
            call()
    assert not (tmp_path / "r").exists()
