"""Untrusted images: a pixel limit checked before decoding (one line naming the file and the limit, API and CLI), and
image tensors scaled by their dtype's range (uint16 is not told to "divide by 255")."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import istr
import istr.data.coco as coco_module
from istr.data import image_tensor, load_image, pil_to_tensor


def _claim_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """A copy of PNG `src` whose IHDR chunk claims width x height (a valid chunk CRC: only the size lies)."""
    raw = bytearray(src.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    dst.write_bytes(bytes(raw))
    return dst


@pytest.fixture
def small_png(tmp_path) -> Path:
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    return path


def test_decompression_bomb_header_is_one_clear_error(small_png, tmp_path):
    bomb = _claim_size(small_png, tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ValueError) as info:
        load_image(bomb)
    text = str(info.value)
    assert f"image file {bomb} is refused" in text and "limit for untrusted images is 89,478,485 pixels" in text
    assert "\n" not in text


def test_our_limit_is_checked_before_decoding(small_png, tmp_path, monkeypatch):
    big = _claim_size(small_png, tmp_path / "big.png", 10_000, 9_000)  # 90 M pixels: over the limit, under PIL's 2x
    with pytest.raises(ValueError, match=rf"^image file {big} is 10000 x 9000 = 90,000,000 pixels, over the limit of "
                                         r"89,478,485 pixels for untrusted images \(istr.data.coco.MAX_IMAGE_PIXELS"):
        load_image(big)
    monkeypatch.setattr(coco_module, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ValueError, match=r"20 x 20 = 400 pixels, over the limit of 399 pixels"):
        load_image(small_png)
    with pytest.raises(ValueError, match=r"over the limit of 399"):
        pil_to_tensor(Image.open(small_png))
    monkeypatch.setattr(coco_module, "MAX_IMAGE_PIXELS", 400)
    assert load_image(small_png).shape == (3, 20, 20)
    monkeypatch.setattr(coco_module, "MAX_IMAGE_PIXELS", None)
    assert load_image(small_png).shape == (3, 20, 20)


def test_image_tensor_scales_by_dtype():
    values = np.arange(12, dtype=np.uint16).reshape(1, 3, 4) * 5000
    want = torch.from_numpy(values.astype(np.float64) / 65535).float().expand(3, -1, -1)
    torch.testing.assert_close(image_tensor(torch.from_numpy(values)), want)  # not "divide by 255"
    rgb = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    assert torch.equal(image_tensor(rgb), rgb.float() / 255)
    assert torch.equal(image_tensor(torch.ones(1, 2, 2, dtype=torch.bool)), torch.ones(3, 2, 2))
    f = torch.rand(3, 4, 4, dtype=torch.float64)
    assert image_tensor(f).dtype == torch.float32
    with pytest.raises(TypeError, match=r"images\[2\] has dtype torch.int32, whose pixel range istr cannot know"):
        image_tensor(torch.zeros(3, 2, 2, dtype=torch.int32), "images[2]")
    with pytest.raises(ValueError, match=r"must be a tensor \[3, H, W\].*got shape \(2, 4, 4\)"):
        image_tensor(torch.zeros(2, 4, 4))


def test_cli_predict_refuses_a_bomb_in_one_line(small_png, tmp_path, capsys):
    from istr.cli import main

    torch.manual_seed(0)
    model = istr.create_model("istr_tiny", num_classes=2, codec=istr.create_codec("dct", mask_size=8, dim=6),
                              backbone="resnet18", num_queries=4, num_stages=1, hidden_dim=16, dynamic_dim=4,
                              ffn_dim=32, num_heads=2, min_size=32, max_size=32, train_min_sizes=(32,))
    istr.save_model(model, tmp_path / "m.safetensors")
    bomb = _claim_size(small_png, tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path / "m.safetensors"), str(bomb), "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"image file {bomb} is refused" in err and "89,478,485 pixels" in err


def test_dataset_checks_its_images_up_front(tmp_path):
    from istr.data import CocoInstances, make_synthetic_coco

    data = make_synthetic_coco(tmp_path / "syn", num_train=4, num_val=0, image_size=48, difficulty="easy",
                               image_format="png")
    ds = CocoInstances(data["train_images"], data["train_annotations"])
    ds.check_files(level="decode")  # all good
    truncated, damaged = ds.image_path(0), ds.image_path(2)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    raw = bytearray(damaged.read_bytes())
    at = raw.index(b"IDAT") + 20
    raw[at : at + 4] = bytes(255 - b for b in raw[at : at + 4])  # inside the compressed pixels: the chunk CRC fails
    damaged.write_bytes(bytes(raw))
    ds.check_files()  # level "exists": both are there and not empty
    for level in ("header", "decode"):
        with pytest.raises(ValueError, match=r"^2 of 4 image files of .* cannot be used: ") as info:
            ds.check_files(level=level)
        assert str(truncated) in str(info.value) and str(damaged) in str(info.value)
    ds.check_files([1, 3], level="decode")
    with pytest.raises(ValueError, match=r"level must be one of 'exists', 'header', 'decode'"):
        ds.check_files(level="full")
    big = ds.image_path(1)
    Image.fromarray(np.zeros((50, 48, 3), np.uint8)).save(big)  # not the json's 48 x 48
    with pytest.raises(ValueError, match=r"1 of 1 image files .*: 50 x 48 \(h x w\) but the json says 48 x 48"):
        ds.check_files([1], level="header")
