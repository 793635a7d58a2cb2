"""`istr` command line under bad input: one line `istr <command>: error: ...` and exit status 2, never a traceback;
output paths checked before any work; fit-codec's ISTR PCA default; AP printed in %; train/eval timing and stages."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import istr
from istr.cli import main
from train_utils import TINY_CODEC, TINY_MODEL, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_data(tmp_path_factory.mktemp("cli_errors") / "data")


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory) -> Path:
    """An untrained tiny model saved as a file (enough for predict/eval plumbing)."""
    from istr.engine.fit_codec import fit_codec_on_coco

    torch.manual_seed(0)
    codec = fit_codec_on_coco("pca", data["train_annotations"], **TINY_CODEC)
    model = istr.create_model("istr_tiny", num_classes=8, codec=codec, **TINY_MODEL)
    path = tmp_path_factory.mktemp("cli_model") / "model.safetensors"
    istr.save_model(model, path)
    return path


def _fails(capsys, args: list[str], *expected: str) -> str:
    """main(args) must exit 2 with exactly one stderr line `istr <cmd>: error: ...` containing `expected`."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    command = next(a for a in args if not a.startswith("-") and a in ("fit-codec", "train", "eval", "predict", "demo"))
    assert lines and lines[-1].startswith(f"istr {command}: error: "), err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def _model_args() -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]


# ------------------------------------------------------------------------------------------------ names and args
def test_unknown_names_and_bad_constructor_args(data, tmp_path, capsys):
    _fails(capsys, ["train", "--model", "nope", "--synthetic", data["root"], "--out", str(tmp_path / "r")],
           "--model: unknown model 'nope'", "istr_tiny")
    assert not (tmp_path / "r").exists()
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--codec", "nope", "--out", str(tmp_path / "c")],
           "--codec: unknown codec 'nope'", "pca")
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--codec-arg", "foo=1",
                    "--out", str(tmp_path / "c")], "--codec-arg does not fit the pca codec", "'foo'")
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--mask-size", "14", "--dim", "8",
                    "--fit-arg", "foo=1", "--out", str(tmp_path / "c")], "--fit-arg does not fit", "'foo'")
    _fails(capsys, ["train", "--synthetic", data["root"], "--model-arg", *_model_args(), "foo=1", "--out",
                    str(tmp_path / "r")], "--model-arg does not fit the istr_tiny preset", "'foo'")
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--out", str(tmp_path / "c")],
           "dim l=60 needs at least 60 masks", "got 14 masks")  # the default ISTR PCA-60 on 14 masks
    _fails(capsys, ["--threads", "-1", "fit-codec", "--ann", data["train_annotations"], "--out", str(tmp_path / "c")],
           "--threads must be >= 1")
    _fails(capsys, ["eval", str(tmp_path), "--synthetic", data["root"], "--device", "gpu"], "'gpu' is not a torch device")
    if not torch.cuda.is_available():
        _fails(capsys, ["predict", str(tmp_path), "x.png", "--device", "cuda"], "CUDA is not available")


def test_errors_reach_the_shell_as_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "istr", "train", "--model", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("istr train: error: --model: unknown model 'nope'; known models:")


# ------------------------------------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_any_work(data, model_file, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("keep me too")
    train = ["train", "--synthetic", data["root"], "--no-progress"]
    _fails(capsys, [*train, "--out", str(a_file)], "is an existing file")
    _fails(capsys, [*train, "--out", str(full)], "existing non-empty directory", "--resume", "--overwrite")
    _fails(capsys, [*train, "--out", str(full), "--resume", "--overwrite"], "pass one of them")
    _fails(capsys, [*train, "--out", str(tmp_path / "r"), "--resume", str(full)], "expected a checkpoint directory")
    image = sorted(Path(data["val_images"]).iterdir())[0]
    _fails(capsys, ["predict", str(model_file), str(image), "--out", str(full)], "non-empty", "--overwrite")
    _fails(capsys, ["predict", str(model_file), str(image), "--out", str(a_file)], "is an existing file")
    _fails(capsys, ["predict", str(model_file), str(tmp_path / "nope.png"), "--out", str(tmp_path / "p")],
           "no image file at", "nope.png")
    _fails(capsys, ["demo", "--out", str(full), "--minutes", "0.1"], "non-empty", "--overwrite")
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--out", str(a_file)], "exists", "--overwrite")
    _fails(capsys, ["fit-codec", "--ann", data["train_annotations"], "--out", str(full)], "is an existing directory")
    _fails(capsys, ["fit-codec", "--ann", str(full), "--out", str(tmp_path / "c")], "is a directory; expected a file")
    evaluate = ["eval", str(model_file), "--synthetic", data["root"], "--no-progress"]
    _fails(capsys, [*evaluate, "--out", str(full)], "--out", "is an existing directory")
    _fails(capsys, [*evaluate, "--results", str(a_file)], "--results", "exists", "--overwrite")
    _fails(capsys, [*evaluate, "--out", str(a_file / "m.json")], "is a file, so no folder can be created")
    assert a_file.read_text() == "keep me" and sorted(p.name for p in full.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "full"]  # nothing was written


def test_predict_ann_must_hold_categories(data, model_file, tmp_path, capsys):
    image = sorted(Path(data["val_images"]).iterdir())[0]
    no_cats = tmp_path / "no_cats.json"
    no_cats.write_text(json.dumps({"images": [], "annotations": []}))
    args = ["predict", str(model_file), str(image), "--out", str(tmp_path / "p")]
    _fails(capsys, [*args, "--ann", str(tmp_path)], "is a directory; expected a file")
    _fails(capsys, [*args, "--ann", str(no_cats)], '"categories" list', "['annotations', 'images']")
    (tmp_path / "bad.json").write_text("{")
    _fails(capsys, [*args, "--ann", str(tmp_path / "bad.json")], "is not valid JSON")
    assert main([*args, "--ann", data["val_annotations"], "--score-threshold", "0"]) == 0
    assert (tmp_path / "p" / "predictions.json").is_file()
    _fails(capsys, [*args, "--ann", data["val_annotations"]], "non-empty", "--overwrite")
    assert main([*args, "--ann", data["val_annotations"], "--overwrite"]) == 0


def test_resume_from_a_corrupt_checkpoint(data, tmp_path, capsys):
    from istr.fileio import atomic_write_bytes

    codec = tmp_path / "codec.safetensors"
    assert main(["fit-codec", "--ann", data["train_annotations"], *sum([[f"--{k.replace('_', '-')}", str(v)]
                 for k, v in TINY_CODEC.items()], []), "--out", str(codec)]) == 0
    run = tmp_path / "run"
    args = ["train", "--synthetic", data["root"], "--codec", str(codec), "--model-arg", *_model_args(),
            "--batch-size", "2", "--checkpoint-every", "1", "--no-progress", "--no-eval", "--out", str(run)]
    assert main([*args, "--max-iters", "1"]) == 0
    state = run / "checkpoints" / "iter_0000001" / "trainer_state.pt"
    atomic_write_bytes(state, state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    _fails(capsys, [*args, "--max-iters", "2", "--resume"], "cannot resume from", "iter_0000001",
           "truncated or corrupt")
    assert main([*args, "--max-iters", "1", "--overwrite"]) == 0  # starts again: the old checkpoints are gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000001", "last"]
    assert [json.loads(l)["iter"] for l in (run / "log.jsonl").read_text().splitlines()] == [1]
    model = run / "checkpoints" / "iter_0000001" / "model.safetensors"
    model.write_bytes(b"garbage")
    _fails(capsys, [*args, "--max-iters", "2", "--resume", str(run)], "cannot resume from", "model.safetensors")


# ------------------------------------------------------------------------------------------------ fit-codec
def test_fit_codec_defaults_to_istr_v1_pca(data, tmp_path, capsys):
    common = ["fit-codec", "--ann", data["train_annotations"], "--mask-size", "14", "--dim", "8"]
    assert main([*common, "--out", str(tmp_path / "a.safetensors")]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert "whiten=True" in first and "logit_space=True" in first and "14 of 14 annotations used" in first
    report = json.loads(rest)
    assert report["fit_stats"]["instances"] == report["fit_masks"] == 14
    codec = istr.load_codec(tmp_path / "a.safetensors")
    assert codec.whiten and codec.logit_space
    preset = istr.create_model("istr_r50_fpn_pca60").codec  # the codec the README's model uses
    assert (preset.whiten, preset.logit_space) == (True, True)
    assert main([*common, "--codec-arg", "whiten=false", "logit_space=false", "--out", str(tmp_path / "b")]) == 0
    assert "whiten=False, logit_space=False" in capsys.readouterr().out
    plain = istr.load_codec(tmp_path / "b")
    assert not plain.whiten and not plain.logit_space
    assert main([*common, "--codec", "dct", "--out", str(tmp_path / "c")]) == 0  # other codecs: no PCA defaults
    assert istr.load_codec(tmp_path / "c").config() == {"mask_size": 14, "dim": 8}


# ------------------------------------------------------------------------------------------------ eval / train
def test_eval_prints_every_stage_in_percent(data, model_file, tmp_path, capsys):
    out = capsys.readouterr()
    assert main(["eval", str(model_file), "--synthetic", data["root"], "--all-stages", "--no-progress",
                 "--out", str(tmp_path / "m.json"), "--results", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    stages = re.findall(r"^stage (\d)/2: mask AP (\S+)  AP50 \S+  AP75 \S+  \|  box AP (\S+)", out, re.M)
    assert [s[0] for s in stages] == ["1", "2"], out
    metrics = json.loads((tmp_path / "m.json").read_text())
    for (_, mask_ap, box_ap), stage in zip(stages, metrics["stages"]):
        assert mask_ap == f"{100 * stage['segm']['AP']:.1f}" and box_ap == f"{100 * stage['bbox']['AP']:.1f}"
    assert re.search(r"^mask: AP \d+\.\d  AP50 \d+\.\d .*\(%\)$", out, re.M), out
    assert isinstance(json.loads((tmp_path / "r.json").read_text()), list)
    assert main(["eval", str(model_file), "--synthetic", data["root"], "--no-progress", "--max-images", "1",
                 "--out", str(tmp_path / "m.json"), "--overwrite"]) == 0


def test_train_times_its_final_evaluation_apart_with_a_progress_bar(data, tmp_path, capsys):
    from istr.fileio import check_readable_file

    codec = tmp_path / "codec.safetensors"
    assert main(["fit-codec", "--ann", data["train_annotations"], "--mask-size", "14", "--dim", "8",
                 "--out", str(codec)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--synthetic", data["root"], "--codec", str(codec), "--model-arg", *_model_args(),
                 "--batch-size", "2", "--max-iters", "1", "--checkpoint-every", "0", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"trained 1 iterations in \d+\.\ds of training \(max_iters\); evaluation \d+\.\ds",
                     captured.out), captured.out
    assert "evaluate" in captured.err  # the final evaluation's progress bar (tqdm writes to stderr)
    assert re.search(r"^mask: AP \d+\.\d", captured.out, re.M)
    saved = json.loads(check_readable_file(run / "train_result.json").read_text())
    assert saved["metrics"]["segm"]["AP"] >= 0 and saved["eval_s"] > 0
    assert f"in {saved['elapsed_s']:.1f}s of training" in captured.out


def test_demo_pretrained_without_network_fails_fast(tmp_path, capsys, monkeypatch, sleeps):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refused at once, network or not
    _fails(capsys, ["demo", "--pretrained", "--out", str(tmp_path / "demo")], "resnet18", "--backbone-checkpoint")
    assert sleeps == [] and not (tmp_path / "demo").exists()  # no retries (they slept ~48 s), nothing written
