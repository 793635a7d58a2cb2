"""Tests for istr.data.synthetic: determinism, shape variety (concave, holes, small), occlusion, COCO validity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_fill_holes

from istr.data import SHAPE_CLASSES, CocoInstances, make_synthetic_coco
from istr.data.synthetic import main


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, str]:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth") / "a", num_train=16, num_val=4, image_size=(128, 160))


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    again = make_synthetic_coco(tmp_path / "b", num_train=16, num_val=4, image_size=(128, 160))
    for key in ("train_annotations", "val_annotations"):
        assert Path(synth[key]).read_bytes() == Path(again[key]).read_bytes()
    first = sorted(Path(synth["train_images"]).iterdir())[0]
    assert first.read_bytes() == (Path(again["train_images"]) / first.name).read_bytes()
    other = make_synthetic_coco(tmp_path / "c", num_train=16, num_val=0, image_size=(128, 160), seed=1)
    assert Path(other["train_annotations"]).read_bytes() != Path(synth["train_annotations"]).read_bytes()


def test_contents_are_varied_and_hard(synth):
    data = json.loads(Path(synth["train_annotations"]).read_text())
    anns = data["annotations"]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert len(data["categories"]) == len(SHAPE_CLASSES) >= 6
    present = {names[a["category_id"]] for a in anns}
    assert len(present) >= 6 and {"star", "cross", "crescent", "L", "ring", "frame"} & present
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).sum() >= 5 and (areas >= 32**2).sum() >= 5  # small and larger objects
    holes = 0
    for a in anns:
        mask = mask_utils.decode(a["segmentation"]).astype(bool)
        assert mask.sum() == a["area"] > 0
        assert list(mask_utils.toBbox(a["segmentation"])) == a["bbox"]
        if names[a["category_id"]] in ("ring", "frame") and a["visible_fraction"] == 1.0:
            holes += binary_fill_holes(mask).sum() > mask.sum()  # the hole is not part of the mask
    assert holes >= 2
    # occlusion: some instances are partly hidden, and visible masks in one image never overlap
    assert any(a["visible_fraction"] < 0.95 for a in anns)
    assert min(a["visible_fraction"] for a in anns) >= 0.4
    by_image: dict[int, np.ndarray] = {}
    for a in anns:
        mask = mask_utils.decode(a["segmentation"]).astype(np.int32)
        by_image[a["image_id"]] = by_image.get(a["image_id"], 0) + mask
    assert max(int(m.max()) for m in by_image.values()) == 1


def test_colour_does_not_give_away_the_class(synth):
    ds = CocoInstances(synth["train_images"], synth["train_annotations"])
    colours: dict[int, list[np.ndarray]] = {}
    for i in range(len(ds)):
        image, target = ds[i]
        for mask, label in zip(target["masks"].bool(), target["labels"].tolist()):
            colours.setdefault(label, []).append(image[:, mask].mean(dim=1).numpy())
    spreads = [np.std(np.stack(c), axis=0).mean() for c in colours.values() if len(c) >= 4]
    assert spreads and min(spreads) > 0.1  # every well-represented class comes in many colours


def test_loads_as_coco_dataset_and_cli(synth, tmp_path, capsys):
    val = CocoInstances(synth["val_images"], synth["val_annotations"])
    assert len(val) == 4 and val.category_names == list(SHAPE_CLASSES) and val.stats["dropped_degenerate_boxes"] == 0
    image, target = val[0]
    assert image.shape == (3, 128, 160) and target["masks"].shape[1:] == (128, 160)
    paths = main([str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1", "--size", "64", "--format", "png"])
    assert Path(paths["train_images"], "000001.png").is_file() and "val_annotations" in capsys.readouterr().out
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_coco(tmp_path / "bad", image_size=(8, 8))


def test_small_fraction_sets_the_size_mix(tmp_path):
    def small_share(fraction: float) -> float:
        paths = make_synthetic_coco(tmp_path / str(fraction), num_train=12, num_val=0, image_size=128,
                                    small_fraction=fraction)
        anns = json.loads(Path(paths["train_annotations"]).read_text())["annotations"]
        # full shapes of half-extent < 12 px cover < 24^2 px; occlusion/truncation only make visible parts smaller
        return float(np.mean([a["area"] < 24**2 for a in anns]))

    assert small_share(1.0) > 0.9 and small_share(0.0) < small_share(1.0) - 0.5
    with pytest.raises(ValueError, match="small_fraction"):
        make_synthetic_coco(tmp_path / "bad", num_train=1, num_val=0, image_size=64, small_fraction=1.5)


def test_easy_shapes_are_whole_and_apart(tmp_path):
    """The "easy" preset: no shape cut by the image border, no two shapes overlapping."""
    paths = make_synthetic_coco(tmp_path / "easy", num_train=30, num_val=0, image_size=96, seed=3, difficulty="easy")
    anns = json.loads(Path(paths["train_annotations"]).read_text())["annotations"]
    assert len(anns) >= 30
    by_image: dict[int, list] = {}
    for a in anns:
        x, y, w, h = a["bbox"]
        assert x >= 1 and y >= 1 and x + w <= 95 and y + h <= 95, a["bbox"]  # clear of the border
        by_image.setdefault(a["image_id"], []).append(mask_utils.decode(a["segmentation"]).astype(bool))
    for masks in by_image.values():
        total = sum(m.astype(int) for m in masks)
        assert total.max() == 1  # disjoint
