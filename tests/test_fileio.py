"""A full disk leaves no litter and says so: every atomic write (models, codecs, torch.save files, bytes) on a small
tmpfs raises one DiskFullError naming the path and the space, and leaves nothing behind (API and CLI). Needs root to
mount the tmpfs; skipped with the reason otherwise."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

import istr
from istr.fileio import DiskFullError, atomic_save, atomic_write_bytes
from istr.io import save_torch_file

SIZE = 1024 * 1024  # the tmpfs: 1 MiB


@pytest.fixture
def small_disk():
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    where = Path(tempfile.mkdtemp(prefix="istr_full_"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def _litter(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_known_size_is_refused_before_writing(small_disk):
    codec = istr.create_codec("pca", mask_size=40, dim=200).fit(torch.rand(300, 40, 40))  # components: 200 x 1600 x 4 B
    out = small_disk / "sub" / "codec.safetensors"
    with pytest.raises(DiskFullError) as info:
        codec.save(out)
    text = str(info.value)
    assert text.startswith(f"not enough space to write the codec file {out}: it needs about 1.3 MB, ") and \
        "free on the device of" in text, text
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    with pytest.raises(DiskFullError, match=r"the trainer state .*state.pt: it needs about 2.2 MB"):
        save_torch_file({"x": torch.zeros(512 * 1024)}, small_disk / "state.pt", "trainer state")
    with pytest.raises(DiskFullError, match=r"the file .*b.bin: it needs about 2.0 MB"):
        atomic_write_bytes(small_disk / "b.bin", b"x" * 2_000_000)
    assert _litter(small_disk) == []


def test_full_during_the_write_removes_the_partial_file(small_disk):
    def write(tmp: str) -> None:  # a writer whose size was not known up front
        with open(tmp, "wb") as f:
            for _ in range(40):
                f.write(b"y" * 65536)

    with pytest.raises(DiskFullError, match=rf"no space left on the device to write the log {small_disk}/big.log: "
                                            r"it did not fit, 1.0 MB are free .*partial file was removed"):
        atomic_save(small_disk / "big.log", write, what="log")
    assert _litter(small_disk) == []
    atomic_write_bytes(small_disk / "ok.bin", b"z" * 1000)  # the disk works again: a small file is written
    assert _litter(small_disk) == ["ok.bin"]


def test_a_bug_in_the_writer_is_not_called_a_full_disk(small_disk):
    def broken(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        atomic_save(small_disk / "x.bin", broken)
    assert _litter(small_disk) == []


def test_cli_fit_codec_on_a_full_disk(small_disk, tmp_path, capsys):
    from istr.cli import main
    from istr.data import make_synthetic_coco

    data = make_synthetic_coco(tmp_path / "syn", num_train=4, num_val=0, image_size=64, difficulty="easy",
                               image_format="png")
    out = small_disk / "codec.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["fit-codec", "--ann", data["train_annotations"], "--codec", "autoencoder", "--fit-arg", "epochs=1",
              "progress=false", "--out", str(out)])  # the default autoencoder's weights: 1.4 MB
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert str(out) in err and "space" in err, err
    assert _litter(small_disk) == []
