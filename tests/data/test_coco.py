"""Tests for istr.data: CocoInstances on real COCO, bad-input errors, joint transforms."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from istr.data import CocoInstances, boxes_from_masks, build_transforms, collate_fn, load_image
from istr.data.transforms import Compose, RandomRelativeCrop

TINY = Path(__file__).parents[3] / "shared" / "data" / "coco_tiny100"


@pytest.fixture(scope="module")
def val_ds() -> CocoInstances:
    if not (TINY / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"real COCO subset not found at {TINY}")
    return CocoInstances(TINY / "val2017", TINY / "annotations" / "instances_val2017.json")


def test_real_coco_targets_match_pycocotools(val_ds):
    coco = val_ds.coco
    assert val_ds.stats["images_total"] == 50 and val_ds.stats["crowd_annotations"] == 5
    assert val_ds.stats["annotations_total"] == 382
    crowd_images = sorted({a["image_id"] for a in coco.dataset["annotations"] if a["iscrowd"]})
    picks = [val_ds.ids.index(crowd_images[0]), 0, 3]
    for index in picks:
        image, target = val_ds[index]
        image_id = target["image_id"]
        info = coco.imgs[image_id]
        assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]  # crowd regions are not targets
        assert len(target["labels"]) == len(anns) > 0
        assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64
        for k, ann in enumerate(anns):
            assert torch.equal(target["masks"][k], torch.from_numpy(coco.annToMask(ann)))
            label = int(target["labels"][k])
            assert val_ds.label_to_category_id[label] == ann["category_id"]
            assert val_ds.category_names[label] == coco.cats[ann["category_id"]]["name"]
            x, y, w, h = ann["bbox"]
            assert torch.allclose(target["boxes"][k], torch.tensor([x, y, x + w, y + h]))
        # json boxes are the polygons' bounds: the rasterised mask's box agrees to within 2 px
        assert (boxes_from_masks(target["masks"]) - target["boxes"]).abs().max() < 2.0
    assert any(coco.imgToAnns[crowd_images[0]][i]["iscrowd"] for i in range(len(coco.imgToAnns[crowd_images[0]])))


def test_category_mapping_round_trip(val_ds):
    ids = val_ds.label_to_category_id
    assert ids == sorted(c["id"] for c in val_ds.coco.dataset["categories"]) and len(ids) == val_ds.num_classes == 80
    assert ids[0] == 1 and ids[-1] == 90  # COCO ids are not contiguous; labels are
    assert all(val_ds.category_id_to_label[cid] == label for label, cid in enumerate(ids))


def test_empty_images_option(val_ds):
    assert len(val_ds) == 48 and val_ds.stats["images_without_annotations"] == 2
    full = CocoInstances(TINY / "val2017", TINY / "annotations" / "instances_val2017.json", include_empty=True)
    assert len(full) == 50
    empty = [i for i in range(len(full)) if full.ids[i] not in set(val_ds.ids)]
    image, target = full[empty[0]]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, *image.shape[-2:])


def test_collate_fn(val_ds):
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_ds, [0, 1]), batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2 and len(targets) == 2
    assert {t["image_id"] for t in targets} == {val_ds.ids[0], val_ds.ids[1]}


# ------------------------------------------------------------------------------------------- bad input
def _write_png(path: Path, h: int = 40, w: int = 50) -> None:
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def _coco_json(path: Path, anns: list[dict], images: list[dict] | None = None) -> Path:
    images = images or [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}]
    data = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "thing"}, {"id": 3, "name": "x"}]}
    path.write_text(json.dumps(data))
    return path


def _ann(i: int, bbox: list[float], crowd: int = 0, cat: int = 7) -> dict:
    x, y, w, h = bbox
    poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": bbox, "iscrowd": crowd, "segmentation": poly,
            "area": w * h}  # fmt: skip


def test_missing_and_corrupt_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoInstances(tmp_path, tmp_path / "nope.json")
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON: .* line 1 column"):
        CocoInstances(tmp_path, bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"wrong\.json.*'annotations', 'categories'"):
        CocoInstances(tmp_path, wrong)
    dangling = _coco_json(tmp_path / "dangling.json", [dict(_ann(1, [1, 1, 5, 5]), image_id=99)])
    with pytest.raises(ValueError, match="unknown image ids"):
        CocoInstances(tmp_path, dangling)


def test_unreadable_empty_and_missing_images(tmp_path):
    ann = _coco_json(tmp_path / "ann.json", [_ann(1, [5, 5, 10, 10])])
    ds = CocoInstances(tmp_path, ann)
    with pytest.raises(FileNotFoundError, match="a.png"):
        ds[0]
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty .*a\.png"):
        ds[0]
    (tmp_path / "a.png").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=r"cannot decode image file .*a\.png"):
        ds[0]
    _write_png(tmp_path / "a.png", h=41, w=50)
    with pytest.raises(ValueError, match=r"a\.png is \(41, 50\).*says \(40, 50\)"):
        ds[0]
    _write_png(tmp_path / "a.png")
    image, target = ds[0]
    assert image.shape == (3, 40, 50) and len(target["labels"]) == 1


def test_degenerate_and_out_of_image_boxes(tmp_path, caplog):
    _write_png(tmp_path / "a.png")
    anns = [
        _ann(1, [5, 5, 10, 10]),  # fine
        _ann(2, [20, 20, 0, 10]),  # zero width: dropped
        _ann(3, [40, 30, 20, 20]),  # partly outside (w=50, h=40): clipped to [40, 30, 50, 40]
        _ann(4, [60, 10, 5, 5]),  # entirely outside: clipped to nothing, dropped
        _ann(5, [1, 1, 30, 30], crowd=1),  # crowd: not a target
        _ann(6, [2, 2, 20, 20], cat=3),
    ]
    with caplog.at_level("WARNING", logger="istr.data.coco"):
        ds = CocoInstances(tmp_path, _coco_json(tmp_path / "ann.json", anns))
    s = ds.stats
    assert s["dropped_degenerate_boxes"] == 2 and s["clipped_boxes"] == 2 and s["crowd_annotations"] == 1
    assert s["instances"] == 3 and "dropped" in caplog.text
    _, target = ds[0]
    assert target["boxes"].tolist() == [[5, 5, 15, 15], [40, 30, 50, 40], [2, 2, 22, 22]]
    assert target["labels"].tolist() == [1, 1, 0]  # category 3 -> label 0, 7 -> label 1
    assert ds.label_to_category_id == [3, 7]
    assert target["masks"][1, 30:40, 40:50].all() and target["masks"].shape == (3, 40, 50)


def test_load_image_formats(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")  # grayscale -> 3 channels
    assert torch.equal(load_image(tmp_path / "x.bmp"), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    gray = load_image(tmp_path / "g.png")
    assert gray.shape == (3, 9, 11) and torch.equal(gray[0], gray[2])


# ------------------------------------------------------------------------------------------- transforms
def _box_mask_gap(target) -> float:
    if len(target["boxes"]) == 0:
        return 0.0
    return float((boxes_from_masks(target["masks"]) - target["boxes"]).abs().max())


def test_flip_keeps_boxes_and_masks_consistent(val_ds):
    flip = build_transforms(True, flip_prob=1.0, crop_prob=0.0)
    image, target = val_ds[1]
    image2, target2 = flip(image, target)
    w = image.shape[-1]
    assert torch.equal(image2, image.flip(-1)) and torch.equal(target2["masks"], target["masks"].flip(-1))
    expected = torch.stack([w - target["boxes"][:, 2], target["boxes"][:, 1], w - target["boxes"][:, 0],
                            target["boxes"][:, 3]], dim=1)  # fmt: skip
    assert torch.allclose(target2["boxes"], expected, atol=1e-4)
    assert abs(_box_mask_gap(target2) - _box_mask_gap(target)) < 1e-3
    assert type(target2["boxes"]) is torch.Tensor and type(target2["masks"]) is torch.Tensor
    assert target2["labels"].tolist() == target["labels"].tolist()


def test_crop_and_resize_keep_boxes_and_masks_consistent(val_ds):
    recipe = build_transforms(True, scale=0.5, flip_prob=0.5, crop_prob=1.0, scale_jitter=True)
    torch.manual_seed(0)
    dropped = 0
    for index in (1, 4, 6):
        image, target = val_ds[index]
        image2, target2 = recipe(image, target)
        h, w = image2.shape[-2:]
        assert min(h, w) <= round(800 * 0.5) and max(h, w) <= round(1333 * 0.5)
        assert target2["masks"].shape == (len(target2["labels"]), h, w) and target2["size"] == (h, w)
        assert len(target2["boxes"]) == len(target2["labels"]) <= len(target["labels"])
        dropped += len(target["labels"]) - len(target2["labels"])
        assert target2["masks"].flatten(1).any(1).all()  # no empty instance survives
        # boxes were recomputed from the cropped masks, then both resized together: within 1 px
        assert _box_mask_gap(target2) <= 1.0
    crop = Compose([RandomRelativeCrop(0.5)])
    image, target = val_ds[1]
    for seed in range(4):
        torch.manual_seed(seed)
        image2, target2 = crop(image, target)
        assert image2.shape[-2:] == (round(image.shape[1] * 0.5), round(image.shape[2] * 0.5))
        assert _box_mask_gap(target2) == 0.0  # crop alone: boxes are exactly the masks' boxes
        dropped += len(target["labels"]) - len(target2["labels"])
    assert dropped > 0  # some instances were cut away entirely and dropped


def test_transforms_identity_and_empty_targets():
    image = torch.rand(3, 20, 30)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 20, 30, dtype=torch.uint8), "image_id": 5, "orig_size": (20, 30)}  # fmt: skip
    same_image, same = build_transforms(False)(image, target)
    assert torch.equal(same_image, image) and same["image_id"] == 5
    torch.manual_seed(0)
    image2, target2 = build_transforms(True, flip_prob=1.0, crop_prob=1.0, crop_min_sizes=(10,))(image, target)
    assert target2["boxes"].shape == (0, 4) and target2["masks"].shape[0] == 0 and image2.shape[-2:] == (7, 11)
    with pytest.raises(ValueError, match="crop_prob"):
        build_transforms(True, crop_prob=1.5)
