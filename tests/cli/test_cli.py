"""The `istr` command line: --help of every subcommand, and a tiny fit-codec -> train -> resume -> eval -> predict run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from istr.cli import build_parser, main, parse_key_values, resolve_model_path
from train_utils import TINY_CODEC, TINY_MODEL, make_data

COMMANDS = ["fit-codec", "train", "eval", "predict", "convert", "export", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: istr {command}") and len(out) > 300


def test_python_dash_m_istr_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "istr", "--help"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


def test_key_value_parsing_and_errors(tmp_path, capsys):
    assert parse_key_values(["a=1", "b=[48, 64]", "c=true", "d=resnet18", "e=1e-3"]) == \
        {"a": 1, "b": [48, 64], "c": True, "d": "resnet18", "e": 1e-3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_key_values(["novalue"])
    with pytest.raises(FileNotFoundError, match="no model file at"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:  # user errors exit 2 with a one-line message, no traceback
        main(["train", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "istr train: error: no training data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--augment", "sideways"])


def _model_args() -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]


def test_fit_codec_train_resume_eval_predict(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    codec = tmp_path / "codec.safetensors"
    assert main(["fit-codec", "--ann", data["train_annotations"], "--codec", "pca", "--mask-size",
                 str(TINY_CODEC["mask_size"]), "--dim", str(TINY_CODEC["dim"]), "--val-ann",
                 data["val_annotations"], "--out", str(codec)]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert codec.is_file() and 0.5 < report["fit_mean_iou"] <= 1 and 0 < report["val_mean_iou"] <= 1

    run = tmp_path / "run"
    common = ["train", "--synthetic", data["root"], "--codec", str(codec), "--model-arg", *_model_args(),
              "--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "2", "--checkpoint-every", "2",
              "--out", str(run), "--no-progress", "--no-eval"]
    assert main(common + ["--max-iters", "2"]) == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    assert main(common + ["--max-iters", "3", "--resume"]) == 0  # continues from checkpoints/iter_0000002
    assert "trained 3 iterations" in capsys.readouterr().out
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "event" not in r]
    assert [r["iter"] for r in steps] == [1, 2, 3] and all("lr" in r and "loss" in r for r in steps)
    assert [(r["iter"], r["event"]) for r in log if "event" in r] == [(2, "resume")]
    assert (run / "model.safetensors").is_file()

    metrics_file = tmp_path / "metrics.json"
    assert main(["eval", str(run), "--synthetic", data["root"], "--out", str(metrics_file), "--no-progress"]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics["segm"]["AP"] <= 1 and 0 <= metrics["bbox"]["AP"] <= 1
    assert "mask: AP" in capsys.readouterr().out
    # the run directory remembers its validation data: `istr eval RUN` needs no data flags
    assert main(["eval", str(run), "--no-progress"]) == 0
    assert "recorded in" in capsys.readouterr().out

    image = sorted(Path(data["val_images"]).iterdir())[0]
    out = tmp_path / "pred"
    assert main(["predict", str(run / "model.safetensors"), str(image), "--out", str(out),
                 "--score-threshold", "0.0", "--ann", data["val_annotations"]]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert records[0]["image"] == str(image) and Path(records[0]["overlay"]).is_file()
    assert 1 <= len(records[0]["scores"]) <= TINY_MODEL["detections_per_image"]  # threshold 0: all non-empty
    assert set(records[0]["names"]) <= {"ellipse", "triangle", "star", "cross", "crescent", "ring", "frame", "L"}


def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--threads", "1", "demo", "--out", str(out), "--iters", "3", "--num-train", "64", "--num-val", "3",
                 "--image-size", "64", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "s per training step" in printed and f"istr predict {out}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 3 and 0 <= metrics["metrics"]["segm"]["AP"] <= 1
    assert metrics["data"]["difficulty"] == "easy" and metrics["seconds_per_iter"] > 0
    report = (out / "report.md").read_text()
    assert "| mask (segm) |" in report and "training time" in report and metrics["machine"]["cpu"] in report
    assert "| device | cpu |" in report and "3 of 3 requested" in report and "Load average" in report
    assert metrics["model"]["denoising_groups"] == 4 and "4 denoising groups" in report
    assert metrics["model"]["timm_kwargs"]["channels"] == [32, 64, 128, 256] and "ResNet-18 (half width" in report
    assert (out / "loss_curve.png").stat().st_size > 5000
    assert len(list((out / "overlays").glob("*.png"))) == 3
    # the demo's output directory works with predict and eval as printed
    image = sorted((out / "data" / "val").iterdir())[0]
    assert main(["predict", str(out), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert main(["eval", str(out), "--no-progress"]) == 0
    assert "mask: AP" in capsys.readouterr().out
    # a second run into the same folder needs --overwrite
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), "--iters", "1", "--num-train", "64", "--num-val", "3", "--no-progress"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_demo_starts_from_a_local_backbone_checkpoint(tmp_path, capsys):
    import timm
    import torch

    import istr

    torch.manual_seed(123)
    ckpt = tmp_path / "resnet18_mine.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), ckpt)  # a classifier's checkpoint
    args = ["--threads", "1", "demo", "--iters", "1", "--num-train", "64", "--num-val", "2",
            "--image-size", "64", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:  # a missing file fails before any data is generated
        main([*args, "--out", str(tmp_path / "no"), "--backbone-checkpoint", str(tmp_path / "missing.pth")])
    assert exit_info.value.code == 2 and "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()

    out = tmp_path / "demo"
    assert main([*args, "--out", str(out), "--backbone-checkpoint", str(ckpt)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["checkpoint_path"] == str(ckpt) and "timm_kwargs" not in metrics["model"]  # full width
    assert f"the backbone checkpoint `{ckpt}`" in (out / "report.md").read_text()
    # the trained backbone is the checkpoint after one small AdamW step, not a fresh random initialisation
    trained = istr.load_model(out / "train" / "model.safetensors").backbone.body.conv1.weight
    start = torch.load(ckpt)["conv1.weight"]
    assert (trained - start).abs().max() < 1e-2 < (trained - torch.randn_like(start) * start.std()).abs().max()


def test_train_eval_predict_an_isda_model_by_name(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    run = tmp_path / "isda"
    args = ["num_queries=6", "num_encoder_layers=1", "num_decoder_layers=2", "hidden_dim=32", "num_heads=4",
            "ffn_dim=64", "mask_feat_dim=16", "kernel_dim=32", "num_groups=8", "min_size=64", "max_size=64",
            "train_min_sizes=null", "detections_per_image=10"]
    assert main(["train", "--model", "isda_tiny", "--synthetic", data["root"], "--model-arg", *args, "--batch-size",
                 "2", "--max-iters", "2", "--checkpoint-every", "2", "--out", str(run), "--no-progress"]) == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    assert main(["eval", str(run), "--all-stages", "--no-progress"]) == 0  # per decoder layer, data from run.json
    assert capsys.readouterr().out.count("stage ") == 2
    image = sorted(Path(data["val_images"]).iterdir())[0]
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "pred"), "--score-threshold", "0"]) == 0
    import istr

    assert type(istr.load_model(run)).__name__ == "ISDA"


def test_train_init_starts_from_another_runs_weights(tmp_path):
    """istr train --init FILE: the new run starts from the file's weights (here a model file of this library; the
    authors' checkpoints go through the same istr.convert.load_init); refused together with --resume."""
    import istr

    data = make_data(tmp_path / "data")
    model_args = ["--model-arg", *(f"{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()),
                  f"codec_config={json.dumps(TINY_CODEC)}"]
    common = ["train", "--synthetic", data["root"], *model_args, "--batch-size", "2", "--no-eval", "--no-progress"]
    assert main([*common, "--max-iters", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--max-iters", "0", "--out", str(tmp_path / "b"), "--init",
                 str(tmp_path / "a" / "model.safetensors")]) == 0
    a, b = istr.load_model(tmp_path / "a"), istr.load_model(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(SystemExit):
        main([*common, "--max-iters", "1", "--out", str(tmp_path / "a"), "--resume", "--init",
              str(tmp_path / "a" / "model.safetensors")])
