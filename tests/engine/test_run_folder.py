"""A run folder one can trust: one writer at a time (two real processes), errors that keep the finished steps
(a corrupt image met by DataLoader workers), no litter on a full disk, --overwrite that validates first and leaves
nothing stale, resume refusing other data or another codec, and files that name themselves in their errors."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from istr.cli import main
from istr.engine import RunDir, RunLockedError, TrainConfig, train
from istr.engine.sampler import ResumableBatchSampler
from train_utils import TINY_CODEC, TINY_MODEL, datasets, fitted_codec, make_data, tiny_model

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    return make_data(tmp_path_factory.mktemp("run_folder") / "data", num_train=8, num_val=3)


@pytest.fixture(scope="module")
def codec_file(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("codec") / "codec.safetensors"
    fitted_codec(data["train_annotations"]).save(path)
    return path


def _train_args(data: dict[str, str], codec: Path, out: Path, *extra: str) -> list[str]:
    model_args = [f"{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()]
    return ["train", "--synthetic", data["root"], "--codec", str(codec), "--model-arg", *model_args,
            "--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "1", "--no-progress", "--no-eval",
            "--out", str(out), *extra]


def _error_line(capsys, args: list[str], *expected: str) -> str:
    """main(args) exits 2 with a last stderr line `istr <command>: error: ...` holding every `expected` text."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    line = [l for l in err.splitlines() if l.strip()][-1]
    assert line.startswith(f"istr {args[0]}: error: "), err
    for text in expected:
        assert text in line, (text, line)
    return line


# ------------------------------------------------------------------------------------------------ one writer
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from istr.engine import TrainConfig, train
    from istr.engine.callbacks import Callback
    from train_utils import datasets, make_data, tiny_model

    class Hold(Callback):  # after step 1: say so, then wait for the test's release file
        def on_step_end(self, trainer, losses):
            if trainer.iteration == 1:
                print("holding", flush=True)
                deadline = time.time() + 120
                while not Path({release!r}).exists() and time.time() < deadline:
                    time.sleep(0.1)

    paths = make_data(Path({root!r}))
    train_set, _ = datasets(paths)
    cfg = TrainConfig(lr=1e-3, batch_size=2, max_iters=2, warmup_iters=1, checkpoint_every=1, progress=False,
                      device="cpu")
    train(tiny_model(paths["train_annotations"]), train_set, cfg, out_dir={out!r}, callbacks=[Hold()])
    print("done", flush=True)
""")


def test_a_second_writer_is_refused_while_a_live_run_holds_the_folder(data, codec_file, tmp_path, capsys):
    out, release = tmp_path / "run", tmp_path / "release"
    script = _HOLDER.format(tests=str(TESTS), release=str(release), root=data["root"], out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
        holder = f"PID {proc.pid} on host "
        # a second `istr train --resume` and a plain one are refused, naming the live writer; nothing is touched
        log_before = (out / "log.jsonl").read_bytes() if (out / "log.jsonl").exists() else b""
        _error_line(capsys, _train_args(data, codec_file, out, "--max-iters", "3", "--resume"),
                    "is being written by a live run", holder)
        _error_line(capsys, _train_args(data, codec_file, out, "--max-iters", "3"), "live run", holder)
        _error_line(capsys, _train_args(data, codec_file, out, "--max-iters", "3", "--overwrite"), "live run")
        # the Python API too, before it truncates the log or loads anything
        train_set, _ = datasets(data)
        cfg = TrainConfig(lr=1e-3, batch_size=2, max_iters=3, progress=False, device="cpu")
        with pytest.raises(RunLockedError, match=f"live run \\({holder}"):
            train(tiny_model(data["train_annotations"]), train_set, cfg, out_dir=out, resume=True)
        log_now = (out / "log.jsonl").read_bytes() if (out / "log.jsonl").exists() else b""
        assert log_now.startswith(log_before)
        # readers are not writers: predict reads the live run's newest complete checkpoint
        image = sorted(Path(data["val_images"]).iterdir())[0]
        assert main(["predict", str(out), str(image), "--out", str(tmp_path / "pred"), "--score-threshold", "0"]) == 0
        assert (tmp_path / "pred" / "predictions.json").is_file()
        release.write_text("")
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not RunDir(out).lock_file.exists()  # released at the end
    # the folder is free: the run continues in this process
    assert main(_train_args(data, codec_file, out, "--max-iters", "3", "--resume")) == 0
    assert "trained 3 iterations" in capsys.readouterr().out


def test_a_stale_lock_of_a_killed_run_is_reported_and_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    script = f"from istr.engine import RunDir; import time; run = RunDir({str(out)!r}); run.lock(); " \
             "print('locked', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"PID {proc.pid} on host"):
            RunDir(out).lock()
        proc.send_signal(signal.SIGKILL)  # dies holding it: the file stays, the flock goes with the process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert RunDir(out).lock_file.exists()
    run = RunDir(out)
    with caplog.at_level(logging.WARNING):
        run.lock()
    assert f"stale lock" in caplog.text and f"PID {proc.pid} on host" in caplog.text
    assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    run.unlock()
    assert not run.lock_file.exists()


# ------------------------------------------------------------------------------------------------ errors keep work
def test_a_corrupt_image_found_by_workers_keeps_the_finished_steps(data, codec_file, tmp_path, capsys, caplog):
    """Decision (documented in istr.engine.hooks.CheckpointOnError and the Trainer): a training image that cannot be
    decoded stops training with one line naming the file, after a checkpoint of the last finished step; replace or
    remove the image and resume. (Skipping it would change the data order of the run being resumed.)"""
    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    paths = make_data(root)
    train_set, _ = datasets(paths)
    seed = TrainConfig().seed
    sampler = ResumableBatchSampler(len(train_set), 2, seed=seed)
    sampler.set_epoch(0)
    batches = [[i for i, _ in b] for b in sampler]
    bad = next(i for i in batches[2] if i not in batches[0] + batches[1])  # first met in iteration 3
    image = train_set.image_path(bad)
    original = image.read_bytes()
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # not empty: the up-front file check passes
    out = tmp_path / "run"
    args = _train_args({"root": str(root)}, codec_file, out, "--workers", "2", "--checkpoint-every", "100",
                       "--max-iters", "5")
    with pytest.raises(SystemExit) as exit_info, caplog.at_level(logging.WARNING):
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith("istr train: error: cannot decode image file") and str(image) in lines[-1], err
    assert "DataLoader worker" not in lines[-1]  # the image's own message, not the worker's folded traceback
    stopped = [l for l in caplog.text.splitlines() if "training stopped at iteration 3" in l]  # stderr in a shell
    assert len(stopped) == 1 and "checkpoint of iteration 2 written to" in stopped[0], caplog.text
    assert str(out / "checkpoints" / "iter_0000002") in stopped[0]
    assert RunDir(out).latest_checkpoint().name == "iter_0000002"
    events = [r for r in RunDir(out).read_log() if r.get("event") == "error"]
    assert events and events[0]["iter"] == 2 and events[0]["error"] == "ValueError"
    # fixed: the run resumes from the kept steps and reaches the same losses as a run that never failed
    image.write_bytes(original)
    assert main([*args, "--resume"]) == 0
    clean = tmp_path / "clean"
    assert main(_train_args({"root": str(root)}, codec_file, clean, "--workers", "2", "--checkpoint-every", "100",
                            "--max-iters", "5")) == 0
    a = {r["iter"]: r["loss"] for r in RunDir(out).read_log() if "event" not in r}
    b = {r["iter"]: r["loss"] for r in RunDir(clean).read_log() if "event" not in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5] and a == b


# ------------------------------------------------------------------------------------------------ full disk
@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MB tmpfs (root only; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_leaves_no_litter_and_says_how_much_space(data, codec_file, small_disk, capsys):
    free_before = shutil.disk_usage(small_disk).free
    out = small_disk / "run"
    line = _error_line(capsys, _train_args(data, codec_file, out, "--max-iters", "2", "--checkpoint-every", "1"),
                       "no space left to write", "iter_0000001", "MB needed", "MB free")
    assert "the partial file was removed" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # no temporary checkpoint folder left
    assert shutil.disk_usage(small_disk).free > free_before - 256 * 1024  # only the small run files remain
    # fit-codec's output file on a disk with 2 KB left: the same one line, no temporary file
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2048))
    _error_line(capsys, ["fit-codec", "--ann", data["train_annotations"], "--mask-size", str(TINY_CODEC["mask_size"]),
                         "--dim", str(TINY_CODEC["dim"]), "--out", str(small_disk / "codec.safetensors")],
                "no space left to write", "codec.safetensors", "MB needed")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "run"]


@pytest.mark.slow  # ~30 s: trains to a checkpoint before the failing write
def test_a_failed_checkpoint_write_through_the_api_leaves_no_temporary_folder(data, tmp_path, monkeypatch):
    import errno

    from istr.engine import checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    model = tiny_model(data["train_annotations"])
    with pytest.raises(OSError, match=r"no space left to write .*iter_0000003 \(about \d+\.\d MB needed"):
        ckpt.save_checkpoint(tmp_path / "ckpts", model, {"iteration": 3})
    assert list((tmp_path / "ckpts").iterdir()) == []


# ------------------------------------------------------------------------------------------------ overwrite
def test_overwrite_validates_first_and_leaves_nothing_stale(data, codec_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = _train_args(data, codec_file, out, "--max-iters", "1", "--checkpoint-every", "1", "--no-eval-at-end")
    args.remove("--no-eval")  # with validation data: run.json records it
    assert main(args) == 0
    assert RunDir(out).val_data() is not None
    before = sorted(p.name for p in out.iterdir())
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"not a codec")
    bad = [a if a != str(codec_file) else str(garbled) for a in args] + ["--overwrite"]
    _error_line(capsys, bad, str(garbled))
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted by a command that failed its checks
    # a new run without validation data: the old run.json's validation set is gone with the rest of the old run
    no_val = _train_args(data, codec_file, out, "--max-iters", "1", "--checkpoint-every", "0", "--overwrite")
    i = no_val.index("--synthetic")
    no_val[i:i + 2] = ["--train-images", data["train_images"], "--train-ann", data["train_annotations"]]
    assert main(no_val) == 0
    capsys.readouterr()
    assert RunDir(out).val_data() is None and not (out / "checkpoints" / "iter_0000001").exists()
    _error_line(capsys, ["eval", str(out), "--no-progress"], "no evaluation data")


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("flags, expected", [
    (["--minutes", "nan"], "--minutes must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--max-iters", "-1"], "--max-iters must be >= 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be >= 0"),
    (["--warmup-factor", "1.5"], "--warmup-factor must be <= 1"),
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--codec-max-masks", "0"], "--codec-max-masks must be >= 1"),
])
def test_every_training_number_is_checked_on_the_cli(data, codec_file, tmp_path, capsys, flags, expected):
    _error_line(capsys, _train_args(data, codec_file, tmp_path / "r", *flags), expected)
    assert not (tmp_path / "r").exists()


def test_numbers_of_eval_predict_and_demo_and_the_api(data, codec_file, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    import istr

    istr.save_model(tiny_model(data["train_annotations"]), model)
    image = sorted(Path(data["val_images"]).iterdir())[0]
    evaluate = ["eval", str(model), "--synthetic", data["root"], "--no-progress"]
    _error_line(capsys, [*evaluate, "--detections", "0"], "--detections must be >= 1, got 0 (int)")
    _error_line(capsys, [*evaluate, "--detections", "-5"], "--detections must be >= 1")
    _error_line(capsys, [*evaluate, "--max-images", "-1"], "--max-images must be >= 1")
    _error_line(capsys, [*evaluate, "--max-images", "0"], "--max-images must be >= 1")
    _error_line(capsys, ["predict", str(model), str(image), "--out", str(tmp_path / "p"), "--score-threshold",
                         "nan"], "--score-threshold must be a finite number")
    _error_line(capsys, ["predict", str(model), str(image), "--out", str(tmp_path / "p"), "--score-threshold",
                         "1.5"], "--score-threshold must be <= 1")
    _error_line(capsys, ["demo", "--out", str(tmp_path / "d"), "--minutes", "nan"], "--minutes must be a finite")
    _error_line(capsys, ["demo", "--out", str(tmp_path / "d"), "--iters", "0"], "--iters must be >= 1")
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()
    for bad, text in ((dict(max_minutes=float("nan")), "max_minutes must be a finite number"),
                      (dict(lr=float("nan")), "lr must be a finite number"),
                      (dict(batch_size=2.0), "batch_size must be an int"),
                      (dict(bf16="False"), "bf16 must be a bool"),
                      (dict(max_iters=True), "max_iters must be an int")):
        with pytest.raises(ValueError, match=text):
            TrainConfig(**bad)


# ------------------------------------------------------------------------------------------------ same run
def test_resume_refuses_changed_training_data_and_another_codec(data, codec_file, tmp_path, capsys):
    from istr.data import make_synthetic_coco

    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    out = tmp_path / "run"
    args = _train_args({"root": str(root)}, codec_file, out, "--checkpoint-every", "1")
    assert main([*args, "--max-iters", "1"]) == 0
    other_codec = tmp_path / "other.safetensors"
    istr_codec = istr_create_codec()
    istr_codec.fit((torch.rand(40, TINY_CODEC["mask_size"], TINY_CODEC["mask_size"]) > 0.5).float())
    istr_codec.save(other_codec)
    other = [a if a != str(codec_file) else str(other_codec) for a in args]
    _error_line(capsys, [*other, "--max-iters", "2", "--resume"], "--codec is not the codec of the run",
                "iter_0000001")
    # the dataset regenerated with more images since the run started
    shutil.rmtree(root)
    make_synthetic_coco(root, num_train=12, num_val=3, image_size=64, seed=0, min_objects=1, max_objects=3)
    _error_line(capsys, [*args, "--max-iters", "2", "--resume"], "training data changed since the checkpoint",
                "number of training samples: checkpoint 8 vs now 12")
    assert [r["iter"] for r in RunDir(out).read_log()] == [1]  # the refused resumes changed nothing


def istr_create_codec():
    import istr

    return istr.create_codec("pca", **TINY_CODEC)


# ------------------------------------------------------------------------------------------------ files name themselves
def test_damaged_run_files_are_named_or_dropped_with_a_warning(data, codec_file, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    args = _train_args(data, codec_file, out, "--checkpoint-every", "1")
    args.remove("--no-eval")
    assert main([*args, "--max-iters", "2", "--no-eval-at-end"]) == 0
    run = RunDir(out)
    # log.jsonl with a non-UTF-8 line: resume drops it with a warning naming the file and the line
    with open(run.log_file, "ab") as f:
        f.write(b'{"iter": 2, "note": "\xff\xfe"}\n')
    # checkpoints/last holding bytes that are not text: the newest complete checkpoint is used, with a warning
    (run.checkpoints / "last").write_bytes(b"\xff\xfe\x00")
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--max-iters", "3", "--resume", "--no-eval-at-end"]) == 0
    assert f"{run.log_file} line" in caplog.text and "dropped an unreadable record" in caplog.text
    assert f"{run.checkpoints / 'last'} is unreadable" in caplog.text
    assert [r["iter"] for r in run.read_log() if "event" not in r] == [1, 2, 3]
    # run.json that is not JSON: `istr eval RUN` names it
    run.record_file.write_bytes(b"{\xff")
    capsys.readouterr()
    _error_line(capsys, ["eval", str(out), "--no-progress"], str(run.record_file))


def test_a_damaged_checkpoint_is_not_called_the_last_good_one(data, tmp_path):
    from istr.engine import NonFiniteLossError

    train_set, _ = datasets(data)
    cfg = TrainConfig(lr=1e-3, batch_size=2, max_iters=4, warmup_iters=1, checkpoint_every=2, progress=False,
                      device="cpu")
    model = tiny_model(data["train_annotations"])
    calls = {"n": 0}

    def nan_at_3(module, args, output):  # iteration 3's loss is NaN; before it, checkpoint 2 gets damaged
        calls["n"] += 1
        if calls["n"] == 3:
            state = tmp_path / "run" / "checkpoints" / "iter_0000002" / "trainer_state.pt"
            state.write_bytes(state.read_bytes()[:200])
            output = {k: v * float("nan") for k, v in output.items()}
        return output

    model.register_forward_hook(nan_at_3)
    with pytest.raises(NonFiniteLossError) as err:
        train(model, train_set, cfg, out_dir=tmp_path / "run")
    msg = str(err.value)
    assert "iter_0000002 is damaged too" in msg and "trainer_state.pt" in msg and "last good" not in msg
