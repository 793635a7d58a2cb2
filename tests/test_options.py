"""Strict option values in the codecs and the data API (istr.checks everywhere): wrong types refused with the value and
its type, NaN/inf and out-of-range numbers refused; CUDA asked for where none exists gets the train --device wording."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import istr
from istr.checks import OptionTypeError
from istr.data import CocoInstances, build_transforms, make_synthetic_coco, read_coco_annotations
from istr.data.coco import load_coco_json
from istr.data.synthetic import main as synthetic_main
from set_utils import blobs

NAN = float("nan")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    return make_synthetic_coco(tmp_path_factory.mktemp("syn"), num_train=3, num_val=1, image_size=48, seed=0,
                               difficulty="easy", image_format="png")


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("pca", dict(mask_size="4"), OptionTypeError, r"mask_size must be an int .*got '4' \(str\)"),
    ("pca", dict(mask_size=8, dim=4.0), OptionTypeError, r"dim must be an int, got 4.0 \(float\)"),
    ("pca", dict(mask_size=8, dim=True), OptionTypeError, r"got True \(bool\)"),
    ("pca", dict(mask_size=8, dim=4, whiten="False"), OptionTypeError, r"whiten must be a bool .*'False' \(str\)"),
    ("pca", dict(mask_size=8, dim=4, logit_space=1), OptionTypeError, r"logit_space must be a bool .*1 \(int\)"),
    ("pca", dict(mask_size=8, dim=4, logit_eps=NAN), ValueError, r"logit_eps must be a finite number, got nan"),
    ("pca", dict(mask_size=8, dim=4, logit_eps=0.5), ValueError, r"logit_eps must be < 0.5"),
    ("identity", dict(mask_size=8, dim="64"), OptionTypeError,
     r"dim must be an int \(>= 1\) or None, got .64. \(str\)"),
    ("dct", dict(mask_size=-8, dim=4), ValueError, r"mask_size must be >= 1, got -8"),
    ("autoencoder", dict(mask_size=8, dim=4, depth=0), ValueError, r"depth must be >= 1, got 0"),
    ("autoencoder", dict(mask_size=8, dim=4, groups="2"), OptionTypeError, r"groups must be an int"),
    ("autoencoder", dict(mask_size=8, dim=4, standardize="no"), OptionTypeError, r"standardize must be a bool"),
])
def test_codec_constructor_options(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        istr.create_codec(name, **kwargs)


AE = dict(mask_size=8, dim=4, base_channels=2, max_channels=4, bottleneck_size=2, depth=1, groups=1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(epochs=0), ValueError, r"epochs must be >= 1, got 0"),
    (dict(epochs="3"), OptionTypeError, r"epochs must be an int .*'3' \(str\)"),
    (dict(lr=NAN), ValueError, r"lr must be a finite number, got nan"),
    (dict(lr=0.0), ValueError, r"lr must be > 0"),
    (dict(batch_size=-5), ValueError, r"batch_size must be >= 1, got -5"),
    (dict(weight_decay=float("inf")), ValueError, r"weight_decay must be a finite number"),
    (dict(augment="yes"), OptionTypeError, r"augment must be a bool"),
    (dict(augment={"affine_prob": 1.5}), ValueError, r"affine_prob must be <= 1, got 1.5"),
    (dict(augment={"spin": 1}), ValueError, r"augment: unknown options \['spin'\]"),
    (dict(keep_best="False"), OptionTypeError, r"keep_best must be a bool"),
    (dict(dice_weight=0, bce_weight=0), ValueError, r"both 0"),
    (dict(device="gpu"), ValueError, r"device='gpu' is not a torch device"),
])
def test_autoencoder_fit_options(kwargs, error, message):
    codec = istr.create_codec("autoencoder", **AE)
    with pytest.raises(error, match=message):
        codec.fit(blobs(8, 8), progress=False, **kwargs)
    assert not codec.is_fitted


def test_autoencoder_refuses_no_empty_or_identical_masks():
    codec = istr.create_codec("autoencoder", **AE)
    with pytest.raises(ValueError, match=r"needs at least 2 masks to fit, got 0"):
        codec.fit([], progress=False)  # no chunks at all: was a torch.cat traceback
    with pytest.raises(ValueError, match=r"all 6 masks given to fit the autoencoder are empty"):
        codec.fit(torch.zeros(6, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"all 6 masks .* are identical"):
        codec.fit(blobs(1, 8).repeat(6, 1, 1), progress=False)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1"):
        istr.create_codec("pca", mask_size=8, dim=2).fit(blobs(8, 8), chunk_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the missing-CUDA error cannot happen")
def test_codec_fit_on_cuda_without_cuda_api_and_cli(synthetic, tmp_path, capsys):
    codec = istr.create_codec("autoencoder", **AE)
    with pytest.raises(ValueError, match=r"^device='cuda': CUDA is not available on this machine; use device='cpu'$"):
        codec.fit(blobs(8, 8), device="cuda", progress=False)
    from istr.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit-codec", "--ann", synthetic["train_annotations"], "--codec", "autoencoder", "--mask-size", "8",
              "--dim", "4", "--fit-arg", "device=cuda", "epochs=1", "--out", str(tmp_path / "ae.safetensors")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "CUDA is not available on this machine; use device='cpu'" in err
    assert not (tmp_path / "ae.safetensors").exists()


# ------------------------------------------------------------------------------------------------ data
def test_dataset_and_reader_options(synthetic):
    images, ann = synthetic["train_images"], synthetic["train_annotations"]
    for kwargs, error, message in [
        (dict(min_box_size=NAN), ValueError, r"min_box_size must be a finite number"),
        (dict(min_box_size=-1), ValueError, r"min_box_size must be >= 0"),
        (dict(min_box_size="1"), OptionTypeError, r"min_box_size must be a number"),
        (dict(include_empty="False"), OptionTypeError, r"include_empty must be a bool .*'False' \(str\)"),
        (dict(check_image_size=0), OptionTypeError, r"check_image_size must be a bool"),
        (dict(segmentations="true"), OptionTypeError, r"segmentations must be a bool"),
        (dict(transforms="flip"), TypeError, r"transforms must be callable"),
    ]:
        with pytest.raises(error, match=message):
            CocoInstances(images, ann, **kwargs)
    coco = load_coco_json(ann)
    with pytest.raises(ValueError, match=r"min_box_size must be a finite number"):
        read_coco_annotations(coco, min_box_size=NAN)
    with pytest.raises(OptionTypeError, match=r"include_crowd must be a bool"):
        read_coco_annotations(coco, include_crowd="no")
    assert len(CocoInstances(images, ann, min_box_size=np.float32(1.0))) == 3


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(flip_prob=NAN), ValueError, r"flip_prob must be a finite number"),
    (dict(crop_prob=1.5), ValueError, r"crop_prob must be <= 1"),
    (dict(scale=0), ValueError, r"scale must be > 0"),
    (dict(scale="0.5"), OptionTypeError, r"scale must be a number"),
    (dict(crop_fraction=0.0), ValueError, r"crop_fraction must be > 0"),
    (dict(max_size=-1), ValueError, r"max_size must be >= 1"),
    (dict(crop_min_sizes=(400, 0)), ValueError, r"crop_min_sizes\[\] must be >= 1"),
    (dict(scale_jitter="yes"), TypeError, r"scale_jitter must be a bool or a list"),
    (dict(scale_jitter=[480.5]), OptionTypeError, r"scale_jitter\[\] must be an int"),
])
def test_transform_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_transforms(True, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_train=-1), ValueError, r"num_train must be >= 0, got -1"),
    (dict(num_train="5"), OptionTypeError, r"num_train must be an int .*'5' \(str\)"),
    (dict(num_val=2.0), OptionTypeError, r"num_val must be an int, got 2.0"),
    (dict(small_fraction=NAN), ValueError, r"small_fraction must be a finite number"),
    (dict(image_size=(8, 64)), ValueError, r"image_size must be >= 16, got 8"),
    (dict(image_size="64"), TypeError, r"image_size must be an int or \(height, width\)"),
    (dict(min_objects=0), ValueError, r"min_objects must be >= 1"),
    (dict(image_format=3), TypeError, r"image_format must be 'png' or 'jpg'"),
])
def test_synthetic_options(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_synthetic_coco(tmp_path / "s", **{**dict(num_train=1, num_val=1, image_size=32), **kwargs})
    assert not (tmp_path / "s").exists()


def test_synthetic_cli_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        synthetic_main([str(tmp_path / "s"), "--small-fraction", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].endswith("small_fraction must be a finite number, got nan (float)"), err


def test_hub_timeout_is_checked():
    from istr.hub import check_pretrained_available

    for value, error, message in [(NAN, ValueError, r"timeout_s must be a finite number"),
                                  (0, ValueError, r"timeout_s must be > 0"),
                                  ("3", OptionTypeError, r"timeout_s must be a number")]:
        with pytest.raises(error, match=message):
            check_pretrained_available("resnet18", timeout_s=value)


def test_load_codec_options(tmp_path):
    istr.create_codec("dct", mask_size=8, dim=4).save(tmp_path / "dct.safetensors")
    with pytest.raises(OptionTypeError, match=r"mask_size must be an int .*'8' \(str\)"):
        istr.load_codec(tmp_path / "dct.safetensors", mask_size="8")
    with pytest.raises(ValueError, match=r"dim must be >= 1, got 0"):
        istr.load_codec(tmp_path / "dct.safetensors", dim=0)
    assert istr.load_codec(tmp_path / "dct.safetensors", mask_size=8, dim=np.int64(4)).dim == 4
