"""Nothing lost, nothing silent: diverging and interrupted runs, reused run folders, changed resumes, late
discovery, category shifts and batch composition, through the public API (each case a few seconds)."""
from __future__ import annotations

import json
import os
import signal
import shutil
from pathlib import Path

import pytest
import torch

import istr
from istr.engine import NonFiniteLossError, TrainConfig, Trainer, evaluate, train
from istr.engine.callbacks import Callback
from istr.engine.checkpoint import list_checkpoints
from train_utils import datasets, make_data, tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = make_data(tmp_path_factory.mktemp("robust"), num_train=6, num_val=3)
    train_set, val_set = datasets(paths, flip=True)
    return paths, train_set, val_set


def _cfg(**kw) -> TrainConfig:
    base = dict(lr=2e-3, batch_size=2, max_iters=6, warmup_iters=2, milestones=(4,), checkpoint_every=2, log_every=1,
                progress=False, device="cpu", seed=3, eval_at_end=False)
    return TrainConfig(**{**base, **kw})


def _steps(out: Path) -> dict[int, dict]:
    return {r["iter"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "event" not in r}


def test_a_diverging_run_stops_with_one_error_and_keeps_only_finite_checkpoints(data, tmp_path):
    paths, train_set, _ = data
    cfg = _cfg(lr=1e6, warmup_iters=0, checkpoint_every=1, max_iters=30, milestones=())
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_model(paths["train_annotations"]), train_set, cfg, out_dir=tmp_path / "run")
    msg = str(err.value)
    assert "at iteration" in msg and "dataset indices [" in msg, msg
    for ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):  # every checkpoint on disk is usable
        weights = istr.load_model(ckpt / "model.safetensors").state_dict()
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), ckpt
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "non_finite" in line]
    assert len(events) == 1 and len(events[0]["indices"]) == 2


class _NaNImage(torch.utils.data.Dataset):
    """The training set with image `bad` replaced by NaNs."""

    def __init__(self, base, bad: int) -> None:
        self.base, self.bad = base, bad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, target = self.base[i]
        return (image * float("nan"), target) if i == self.bad else (image, target)


def test_a_nan_image_takes_the_same_path_and_leaves_batchnorm_clean(data, tmp_path):
    paths, train_set, val_set = data
    model = tiny_model(paths["train_annotations"])
    cfg = _cfg(batch_size=6, max_iters=1, shuffle=False)
    with pytest.raises(NonFiniteLossError, match=r"dataset indices \[0, 1, 2, 3, 4, 5\].*images\[4\] contains NaN"):
        train(model, _NaNImage(train_set, 4), cfg, out_dir=tmp_path / "run")
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    assert buffers and all(torch.isfinite(b).all() for b in buffers)  # rejected before BatchNorm saw it
    metrics = evaluate(model, val_set, progress=False)
    assert 0 <= metrics["segm"]["AP"] <= 1


class _Signal(Callback):
    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def on_step_end(self, trainer, losses) -> None:
        if trainer.iteration == self.at:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum,raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_an_interrupt_checkpoints_the_last_step_and_resume_is_exact(data, tmp_path, signum, raised):
    paths, train_set, _ = data
    cfg = _cfg(checkpoint_every=0)  # no periodic checkpoints: the interrupt alone must save the work
    full = train(tiny_model(paths["train_annotations"]), train_set, cfg, out_dir=tmp_path / "full")
    with pytest.raises(raised):
        train(tiny_model(paths["train_annotations"]), train_set, cfg, out_dir=tmp_path / "cut",
              callbacks=[_Signal(3, signum)])
    assert [c.name for c in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["iter_0000003"]
    resumed = train(tiny_model(paths["train_annotations"], seed=9), train_set, cfg, out_dir=tmp_path / "cut",
                    resume=True)
    a, b = _steps(tmp_path / "full"), _steps(tmp_path / "cut")
    assert [a[i]["loss"] for i in a] == [b[i]["loss"] for i in b] and len(a) == 6
    wa, wb = istr.load_model(full.model_path).state_dict(), istr.load_model(resumed.model_path).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_previous_run_is_refused_unless_resumed_or_overwritten(data, tmp_path):
    paths, train_set, _ = data
    out = tmp_path / "run"
    train(tiny_model(paths["train_annotations"]), train_set, _cfg(max_iters=2), out_dir=out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="resume.*overwrite"):
        train(tiny_model(paths["train_annotations"]), train_set, _cfg(max_iters=2), out_dir=out)
    assert (out / "model.safetensors").read_bytes() == before  # nothing was touched
    train(tiny_model(paths["train_annotations"], seed=5), train_set, _cfg(max_iters=2), out_dir=out, overwrite=True)
    assert sorted(_steps(out)) == [1, 2]  # a fresh log, not appended to the old one
    assert (out / "model.safetensors").read_bytes() != before


def test_resume_refuses_a_new_data_order_and_applies_a_new_lr_exactly(data, tmp_path):
    from istr.engine.train import warmup_multistep_factor

    paths, train_set, _ = data
    out = tmp_path / "run"
    train(tiny_model(paths["train_annotations"]), train_set, _cfg(max_iters=4), out_dir=out)
    for change in ({"batch_size": 3}, {"seed": 4}, {"shuffle": False}):
        with pytest.raises(ValueError, match=f"{next(iter(change))}: checkpoint"):
            train(tiny_model(paths["train_annotations"]), train_set, _cfg(max_iters=6, **change), out_dir=out,
                  resume=True)
    train(tiny_model(paths["train_annotations"]), train_set, _cfg(max_iters=6, lr=1e-3, milestones=(5,)), out_dir=out,
          resume=True)
    steps = _steps(out)
    for it in (5, 6):  # the lr logged after step `it` is the new base lr times the new schedule
        assert steps[it]["lr"] == pytest.approx(1e-3 * warmup_multistep_factor(it, 2, 0.01, (5,), 0.1))
    resume_event = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"resume"' in line][-1]
    assert resume_event["changed"]["lr"] == [2e-3, 1e-3] and resume_event["changed"]["milestones"] == [[4], [5]]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 1e-3


def test_problems_are_found_before_the_first_step(data, tmp_path):
    paths, _, _ = data
    copy = tmp_path / "data"
    shutil.copytree(paths["root"], copy)
    train_set, _ = datasets({k: v.replace(paths["root"], str(copy)) for k, v in paths.items()})
    victim = train_set.image_path(3)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        train(tiny_model(paths["train_annotations"]), train_set, _cfg(), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "log.jsonl").exists()  # not one step ran
    victim.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="empty"):
        train(tiny_model(paths["train_annotations"]), train_set, _cfg(), out_dir=tmp_path / "run2")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoints folder goes")
    ok_set, _ = datasets(paths)
    with pytest.raises(PermissionError, match="cannot write training output"):
        train(tiny_model(paths["train_annotations"]), ok_set, _cfg(), out_dir=blocked)
    assert not (blocked / "log.jsonl").exists()


def test_a_torn_log_line_does_not_stop_a_resume(data, tmp_path):
    paths, train_set, _ = data
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(paths["train_annotations"]), train_set, _cfg(checkpoint_every=2), out_dir=out,
              callbacks=[_Signal(3, signal.SIGINT)])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 4, "lr": 0.00')  # a crash while writing the last line
    result = train(tiny_model(paths["train_annotations"]), train_set, _cfg(checkpoint_every=2), out_dir=out,
                   resume=True)
    assert result.iterations == 6 and sorted(_steps(out)) == [1, 2, 3, 4, 5, 6]


def test_evaluation_refuses_other_categories(data, tmp_path):
    from istr.data import CocoInstances

    paths, train_set, val_set = data
    model = tiny_model(paths["train_annotations"])
    train(model, train_set, _cfg(max_iters=1), out_dir=tmp_path / "run")
    assert model.categories[0] == {"id": 1, "name": "ellipse"}  # taken from the training set, saved with it
    assert istr.load_model(tmp_path / "run" / "model.safetensors").categories == model.categories
    ann = json.loads(Path(paths["val_annotations"]).read_text())
    shifted = {**ann, "categories": [{"id": 0, "name": "background"}] + ann["categories"]}
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    with pytest.raises(ValueError, match="predicts 8 classes but the evaluation data has 9"):
        evaluate(model, CocoInstances(paths["val_images"], tmp_path / "shifted.json", include_empty=True))
    renamed = {**ann, "categories": [{**c, "name": c["name"].upper()} for c in ann["categories"]]}
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(ValueError, match="categories are not the model's"):
        evaluate(model, CocoInstances(paths["val_images"], tmp_path / "renamed.json", include_empty=True))
    from train_utils import TINY_MODEL, fitted_codec

    three = istr.create_model("istr_tiny", num_classes=3, codec=fitted_codec(paths["train_annotations"]), **TINY_MODEL)
    with pytest.raises(ValueError, match="predicts 3 classes but the training set has 8"):
        Trainer(three, train_set, _cfg(), out_dir=tmp_path / "other")


@pytest.mark.parametrize("family", ["istr", "isda"])
def test_batch_composition_does_not_change_detections(family):
    torch.manual_seed(0)
    if family == "istr":
        model = istr.create_model("istr_tiny", num_classes=3, codec=istr.create_codec("dct", mask_size=16, dim=12),
                                  num_queries=8, num_stages=2, hidden_dim=32, dynamic_dim=8, ffn_dim=64, num_heads=4,
                                  detections_per_image=10, min_size=64, max_size=160)
    else:
        model = istr.create_model("isda_tiny", num_classes=3, num_queries=8, num_encoder_layers=1,
                                  num_decoder_layers=1, hidden_dim=32, num_heads=4, ffn_dim=64, mask_feat_dim=16,
                                  kernel_dim=32, num_groups=8, detections_per_image=10, min_size=64, max_size=160)
    model.eval()
    g = torch.Generator().manual_seed(0)
    sizes = [(60, 80), (100, 50), (64, 64), (90, 120), (40, 70), (75, 75), (50, 100), (64, 150)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        alone = [model([image])[0] for image in images]
        together = model(images)
    for a, b in zip(alone, together):
        assert torch.equal(a["labels"], b["labels"]) and len(a["labels"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)


def test_the_authors_polygon_target_crop_is_an_option(data, tmp_path):
    from istr.data import CocoInstances, build_transforms

    paths, _, _ = data
    ann = json.loads(Path(paths["train_annotations"]).read_text())
    for a in ann["annotations"]:  # the synthetic json has RLEs: give it polygons, as COCO has
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        a["area"] = w * h
    (tmp_path / "poly.json").write_text(json.dumps(ann))
    flips = build_transforms(True, crop_prob=0.0)
    train_set = CocoInstances(paths["train_images"], tmp_path / "poly.json", transforms=flips, segmentations=True)
    model = tiny_model(paths["train_annotations"], target_crop="polygon")
    result = train(model, train_set, _cfg(max_iters=2, checkpoint_every=0), out_dir=tmp_path / "run")
    assert result.iterations == 2 and istr.load_model(result.model_path).target_crop == "polygon"
    plain = CocoInstances(paths["train_images"], tmp_path / "poly.json")
    with pytest.raises(ValueError, match="segmentations"):  # names the fix: CocoInstances(segmentations=True)
        model.train()(*map(list, zip(plain[0])))
    cropping = CocoInstances(paths["train_images"], tmp_path / "poly.json", transforms=build_transforms(True),
                             segmentations=True)
    with pytest.raises(ValueError, match="horizontal flips only"):
        cropping[0]


def test_the_step_timer_estimates_from_steps_after_the_warm_up():
    from types import SimpleNamespace

    from istr.engine.callbacks import StepTimer

    said: list[str] = []
    records: list[dict] = []
    trainer = SimpleNamespace(is_main=True, cfg=SimpleNamespace(max_iters=105), iteration=0, last_step_seconds=0.0,
                              log=records.append)
    timer = StepTimer(calibrate=3, skip=2, echo=said.append)
    timer.on_train_start(trainer)
    for step, seconds in enumerate([9.0, 5.0, 1.0, 1.2, 0.8, 1.0, 4.0], start=1):  # 2 slow warm-up steps, then ~1 s
        trainer.iteration, trainer.last_step_seconds = step, seconds
        timer.on_step_end(trainer, {})
    assert said[0] == "1.00 s per training step (median of steps 3-5); 100 steps to go, expected 1.7 min more"
    assert records[0] == {"iter": 5, "event": "speed", "seconds_per_iter": 1.0}
    assert len(said) == 2 and said[1].startswith("warning: step 7 took 4.00 s, 4.0x the median 1.00 s")

    # a run shorter than skip + calibrate still gets its estimate, from every step it has
    short = SimpleNamespace(**{**vars(trainer), "cfg": SimpleNamespace(max_iters=3)})
    said.clear()
    timer = StepTimer(echo=said.append)  # skip 5, calibrate 10
    timer.on_train_start(short)
    for step in (1, 2, 3):
        short.iteration, short.last_step_seconds = step, 2.0
        timer.on_step_end(short, {})
    assert said == ["2.00 s per training step (median of steps 1-3); 0 steps to go, expected 0.0 min more"]

    # reused for a longer run, the timer starts afresh with the windows it was built with (skip 5, calibrate 10)
    said.clear()
    long = SimpleNamespace(**{**vars(trainer), "cfg": SimpleNamespace(max_iters=100)})
    timer.on_train_start(long)
    for step in range(1, 16):
        long.iteration, long.last_step_seconds = step, 3.0
        timer.on_step_end(long, {})
    assert said == ["3.00 s per training step (median of steps 6-15); 85 steps to go, expected 4.2 min more"]
