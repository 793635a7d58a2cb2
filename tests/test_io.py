"""Model, codec and training-state files are verified on load: checksums of every tensor and of the metadata, the
format version, the metadata keys, the config, the categories; errors name the file and the key (API and CLI)."""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import istr
from istr.checks import OptionTypeError
from istr.io import CorruptFileError, load_torch_file, write_safetensors

TINY = dict(backbone="resnet18", num_queries=4, num_stages=1, hidden_dim=16, dynamic_dim=4, ffn_dim=32, num_heads=2,
            detections_per_image=5, min_size=64, max_size=96, train_min_sizes=(64,))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = istr.create_model("istr_tiny", num_classes=3, codec=istr.create_codec("dct", mask_size=8, dim=6), **TINY)
    model.categories = [{"id": i + 1, "name": f"c{i}"} for i in range(3)]
    path = tmp_path_factory.mktemp("files") / "model.safetensors"
    istr.save_model(model, path)
    return path


def _meta_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return meta, load_file(str(path))


def _tensor_offset(path: Path, name: str) -> int:
    """The file offset of tensor `name`'s first byte (safetensors layout: 8-byte header length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


def _rewrite(src: Path, dst: Path, **meta_changes) -> Path:
    """src's tensors with changed metadata, written through istr (fresh checksums): only the change is wrong."""
    meta, tensors = _meta_tensors(src)
    meta = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None and k != "checksums"}
    write_safetensors(dst, tensors, meta)
    return dst


def test_saved_files_carry_checksums_and_load_bit_exact(model_file):
    meta, tensors = _meta_tensors(model_file)
    assert meta["version"] == "3"
    sums = json.loads(meta["checksums"])
    assert sums["algorithm"] == "crc32" and set(sums["tensors"]) == set(tensors)
    loaded = istr.load_model(model_file)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, tensors[k]), k
    assert loaded.categories == [{"id": i + 1, "name": f"c{i}"} for i in range(3)]


def test_overwritten_tensor_bytes_are_caught_not_loaded_as_nan(model_file, tmp_path):
    bad = tmp_path / "bad.safetensors"
    _, tensors = _meta_tensors(model_file)
    name = max(tensors, key=lambda k: tensors[k].numel())
    raw = bytearray(model_file.read_bytes())
    at = _tensor_offset(model_file, name) + 16
    raw[at : at + 8] = b"\xff" * 8  # NaN bytes in float32
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=rf"model file {bad} is corrupt: the bytes of tensor '{name}'"):
        istr.load_model(bad)
    assert issubclass(CorruptFileError, ValueError)


def test_changed_metadata_is_caught(model_file, tmp_path):
    meta, tensors = _meta_tensors(model_file)
    config = json.loads(meta["config"])
    config["num_queries"] = 5
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(CorruptFileError, match=r"its metadata \(config, categories, ...\) does not match"):
        istr.load_model(tmp_path / "m.safetensors")
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={**meta, "checksums": "{broken"})
    with pytest.raises(ValueError, match=r"metadata key 'checksums' is not valid JSON"):
        istr.load_model(tmp_path / "c.safetensors")


def test_files_written_before_checksums_still_load(model_file, tmp_path):
    meta, tensors = _meta_tensors(model_file)
    legacy = {k: v for k, v in meta.items() if k != "checksums"}
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={**legacy, "version": "2"})
    model = istr.load_model(tmp_path / "v2.safetensors")
    assert torch.equal(model.state_dict()[next(iter(tensors))], tensors[next(iter(tensors))])
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=legacy)  # version 3 must have them
    with pytest.raises(ValueError, match=r"v3.safetensors: metadata key 'checksums' missing"):
        istr.load_model(tmp_path / "v3.safetensors")


def test_newer_format_version_is_refused(model_file, tmp_path):
    path = _rewrite(model_file, tmp_path / "new.safetensors", version="4")
    with pytest.raises(ValueError, match=r"new.safetensors has format version 4, newer than this istr .* upgrade"):
        istr.load_model(path)
    with pytest.raises(ValueError, match=r"metadata key 'version' is 'x'"):
        istr.load_model(_rewrite(model_file, tmp_path / "x.safetensors", version="x"))


@pytest.mark.parametrize("change, message", [
    (dict(config=None), r"metadata key 'config' missing"),
    (dict(architecture=None), r"metadata key 'architecture' missing"),
    (dict(version=None), r"metadata key 'version' is missing"),
    (dict(architecture="nope"), r"metadata key 'architecture' is 'nope', which is not a registered architecture"),
    (dict(extra="1"), r"unknown metadata key 'extra'"),
    (dict(config="{not json"), r"metadata key 'config' is not valid JSON"),
    (dict(config="[1, 2]"), r"metadata key 'config' must be a JSON object, got list"),
    (dict(categories=json.dumps([{"id": 1, "name": "a"}])),
     r"metadata key 'categories' lists 1 categories but the model has num_classes=3"),
    (dict(categories=json.dumps(["a", "b", "c"])), r"metadata key 'categories' must be a list of \{'id', 'name'\}"),
])
def test_bad_metadata_one_error_naming_file_and_key(model_file, tmp_path, change, message):
    path = _rewrite(model_file, tmp_path / "bad.safetensors", **change)
    with pytest.raises(ValueError, match=rf"model file {path}: {message}" if "version 4" not in message else message):
        istr.load_model(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(no_such_option=1), r"metadata key 'config' does not build a 'istr' model \(TypeError"),
    (lambda c: c.update(backbone=None), r"metadata key 'config' does not build a 'istr' model \(ValueError"),
])
def test_config_that_does_not_build_the_model(model_file, tmp_path, edit, message):
    meta, _ = _meta_tensors(model_file)
    config = json.loads(meta["config"])
    edit(config)
    path = _rewrite(model_file, tmp_path / "cfg.safetensors", config=json.dumps(config))
    with pytest.raises(ValueError, match=rf"model file {path}: {message}"):
        istr.load_model(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the missing-CUDA error cannot happen")
def test_cuda_map_location_without_cuda_is_one_clear_error(model_file, tmp_path):
    wording = r"map_location='cuda': CUDA is not available on this machine; use map_location='cpu'"
    with pytest.raises(ValueError, match=wording):
        istr.load_model(model_file, map_location="cuda")
    codec = istr.create_codec("dct", mask_size=8, dim=6)
    codec.save(tmp_path / "dct.safetensors")
    with pytest.raises(ValueError, match=wording):
        istr.load_codec(tmp_path / "dct.safetensors", map_location="cuda")
    with pytest.raises(OptionTypeError, match=r"map_location must be a device name .* got 0 \(int\)"):
        istr.load_model(model_file, map_location=0)


# ------------------------------------------------------------------------------------------------ codecs
def test_codec_files_are_verified(tmp_path):
    codec = istr.create_codec("pca", mask_size=8, dim=3).fit(torch.rand(40, 8, 8))
    path = tmp_path / "pca.safetensors"
    codec.save(path)
    raw = bytearray(path.read_bytes())
    at = _tensor_offset(path, "components")
    raw[at : at + 4] = b"\x00\x00\xc0\x7f"  # a float32 NaN
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"codec file .*bad.safetensors is corrupt: the bytes of tensor "
                                               r"'components'"):
        istr.load_codec(tmp_path / "bad.safetensors")
    for change, message in [(dict(version="3"), r"format version 3, newer than this istr"),
                            (dict(extra="x"), r"unknown metadata key 'extra'"),
                            (dict(codec="nope"), r"metadata key 'codec' is 'nope', not a registered codec"),
                            (dict(config=None), r"metadata key 'config' missing"),
                            (dict(config=json.dumps({"mask_size": "8", "dim": 3})),
                             r"metadata key 'config' does not build a 'pca' codec \(mask_size must be an int")]:
        bad = _rewrite(path, tmp_path / "meta.safetensors", **change)
        with pytest.raises(ValueError, match=message):
            istr.load_codec(bad)


def test_unfitted_codec_is_not_saved(tmp_path):
    with pytest.raises(istr.codecs.NotFittedError, match=r"before save\(\)"):
        istr.create_codec("pca", mask_size=8, dim=3).save(tmp_path / "pca.safetensors")
    assert not (tmp_path / "pca.safetensors").exists()


# ------------------------------------------------------------------------------------------------ torch.save files
def test_load_torch_file_names_the_file_for_truncated_and_damaged_files(tmp_path):
    state = {"iteration": 3, "weights": torch.randn(2000)}
    good = tmp_path / "trainer_state.pt"
    torch.save(state, good)
    assert load_torch_file(good, "training state")["iteration"] == 3
    raw = good.read_bytes()
    (tmp_path / "short.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match=r"^training state .*short.pt is truncated or not a torch.save file"):
        load_torch_file(tmp_path / "short.pt", "training state")
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.file_size >= 8000)
    damaged = bytearray(raw)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    damaged[start : start + 8] = b"\xff" * 8
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match=r"damaged.pt is corrupt: its record '.*' does not match the checksum"):
        load_torch_file(tmp_path / "damaged.pt", "training state")
    with pytest.raises(FileNotFoundError, match="no training state at"):
        load_torch_file(tmp_path / "missing.pt", "training state")


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_reports_a_corrupt_model_file_in_one_line(model_file, tmp_path, capsys):
    from PIL import Image

    from istr.cli import main

    _, tensors = _meta_tensors(model_file)
    name = max(tensors, key=lambda k: tensors[k].numel())
    raw = bytearray(model_file.read_bytes())
    at = _tensor_offset(model_file, name)
    raw[at : at + 8] = b"\xff" * 8
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as info:
        main(["predict", str(bad), str(tmp_path / "a.png"), "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"model file {bad} is corrupt: the bytes of tensor '{name}'" in err


# ------------------------------------------------------------------------------------------------ checkpoints
def test_verify_checkpoint_and_an_unreadable_last_pointer(model_file, tmp_path):
    from istr.io import latest_checkpoint, save_torch_file, verify_checkpoint

    root = tmp_path / "checkpoints"
    for it in (5, 10):
        ckpt = root / f"iter_{it:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(model_file.read_bytes())
        save_torch_file({"format": "istr-trainer-state", "iteration": it, "m": torch.randn(3000)},
                        ckpt / "trainer_state.pt", "training state")
        verify_checkpoint(ckpt)
    (root / "last").write_bytes(b"\xff\xfeiter_0000005\n")  # not UTF-8
    with pytest.warns(UserWarning, match=r"last is unreadable .*using the newest complete checkpoint"):
        assert latest_checkpoint(root) == root / "iter_0000010"
    (root / "last").write_text("iter_0000005\n")
    assert latest_checkpoint(root) == root / "iter_0000005"
    with pytest.warns(UserWarning, match="last is unreadable"):
        (root / "last").write_bytes(b"\x80")
        assert istr.io.find_model_file(tmp_path) == root / "iter_0000010" / "model.safetensors"  # a run folder

    newest = root / "iter_0000010"
    raw = bytearray((newest / "trainer_state.pt").read_bytes())
    with zipfile.ZipFile(newest / "trainer_state.pt") as z:
        info = next(i for i in z.infolist() if i.file_size >= 12000)
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 50
    raw[at : at + 4] = b"\x00\x00\xc0\x7f"
    (newest / "trainer_state.pt").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"training state .*iter_0000010/trainer_state.pt is corrupt"):
        verify_checkpoint(newest)
    _, tensors = _meta_tensors(model_file)
    name = next(iter(tensors))
    raw = bytearray(model_file.read_bytes())
    at = _tensor_offset(model_file, name)
    raw[at] ^= 0x01  # one bit
    (root / "iter_0000005" / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"iter_0000005/model.safetensors is corrupt: the bytes of tensor"):
        verify_checkpoint(root / "iter_0000005")
    (root / "iter_0000005" / "trainer_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="trainer_state.pt is missing"):
        verify_checkpoint(root / "iter_0000005")


def test_read_json_names_the_file_for_every_decode_error(tmp_path):
    from istr.fileio import read_json

    cases = {"latin1.json": (b'{"name": "caf\xe9"}', r"run record .*latin1.json is not UTF-8 text"),
             "torn.json": (b'{"a": [1, 2', r"run record .*torn.json is not valid JSON: .* line 1 column 12"),
             "empty.json": (b"", r"run record .*empty.json is not valid JSON: Expecting value at line 1 column 1")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            read_json(tmp_path / name, "run record")
    (tmp_path / "ok.json").write_bytes('{"name": "café"}'.encode())
    assert read_json(tmp_path / "ok.json") == {"name": "café"}
