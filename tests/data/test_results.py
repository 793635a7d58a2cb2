"""validate_coco_results: every detection's fields checked against the ground truth before pycocotools scores them;
the compressed-RLE decoder against pycocotools' own encoder."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from istr.data.results import rle_string_counts, validate_coco_results

GT = {"images": [{"id": 1, "height": 20, "width": 30, "file_name": "a.png"},
                 {"id": 2, "height": 8, "width": 8, "file_name": "b.png"}],
      "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}], "annotations": []}


def _runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a mask in column-major order, starting with a run of zeros (the COCO RLE definition)."""
    flat, out, last, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != last:
            out.append(run)
            last, run = v, 0
        run += 1
    out.append(run)
    return out


def _rle(h: int, w: int, y0: int = 2, y1: int = 9, x0: int = 3, x1: int = 12) -> dict:
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def _det(**changes) -> dict:
    det = {"image_id": 1, "category_id": 3, "score": 0.9, "bbox": [3.0, 2.0, 9.0, 7.0], "segmentation": _rle(20, 30)}
    det.update(changes)
    return {k: v for k, v in det.items() if v is not _DROP}


_DROP = object()


def test_rle_string_counts_matches_pycocotools_encoder():
    rng = np.random.default_rng(0)
    for t in range(150):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if t % 3 == 0:  # long runs: multi-character, negative deltas
            mask[:] = 0
            mask[h // 4 : h // 2 + 1, w // 4 : w // 2 + 1] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        assert rle_string_counts(counts).tolist() == _runs(mask), t
        assert rle_string_counts(counts.decode("ascii")).tolist() == _runs(mask), t
    assert rle_string_counts("a!b") is None  # '!' is below '0'
    assert rle_string_counts("0" + chr(48 + 0x20)) is None  # the last value says more characters follow


def test_valid_results_pass_unchanged():
    results = [_det(), _det(image_id=2, category_id=7, segmentation=_rle(8, 8, 1, 4, 1, 4), bbox=[1, 1, 3, 3]),
               _det(segmentation={"size": [20, 30], "counts": _runs(np.zeros((20, 30), np.uint8))}),  # uncompressed
               _det(segmentation=[[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]]), _det(bbox=_DROP),
               _det(score=np.float32(0.5), image_id=np.int64(1))]
    assert validate_coco_results(results, GT, ("bbox", "segm")) == results
    assert validate_coco_results([_det(segmentation=_DROP)], GT, "bbox")  # bbox AP needs no mask


@pytest.mark.parametrize("changes, field, message", [
    (dict(score=float("nan")), "score", r"must be a finite number, got nan \(float\)"),
    (dict(score=float("inf")), "score", r"finite number, got inf"),
    (dict(score="0.9"), "score", r"got '0.9' \(str\)"),
    (dict(score=True), "score", r"got True \(bool\)"),
    (dict(score=_DROP), "score", r"missing"),
    (dict(bbox=[1.0, 2.0, 3.0]), "bbox", r"four finite numbers, got \[1.0, 2.0, 3.0\]"),
    (dict(bbox=[1.0, 2.0, float("nan"), 3.0]), "bbox", r"four finite numbers"),
    (dict(bbox=[1.0, 2.0, "3", 3.0]), "bbox", r"four finite numbers"),
    (dict(bbox=[1.0, 2.0, -3.0, 3.0]), "bbox", r"width and height must be >= 0"),
    (dict(bbox="1 2 3 4"), "bbox", r"four finite numbers"),
    (dict(segmentation=_rle(21, 30)), "segmentation", r"RLE size \[21, 30\] differs from its image's size \[20, 30\]"),
    (dict(segmentation={"size": [20, 30], "counts": "garbage!!"}), "segmentation",
     r"not a valid compressed COCO RLE string"),
    (dict(segmentation={"size": [20, 30], "counts": _rle(8, 8)["counts"]}), "segmentation",
     r"RLE counts cover 64 pixels, its size \[20, 30\] has 600"),
    (dict(segmentation={"size": [20, 30], "counts": [10, 20]}), "segmentation", r"cover 30 pixels"),
    (dict(segmentation={"size": [20, 30], "counts": [700, -100]}), "segmentation", r"negative run length"),
    (dict(segmentation={"size": [20, 30], "counts": 5}), "segmentation", r"string \(compressed\) or a list"),
    (dict(segmentation={"counts": "abc"}), "segmentation", r"needs 'size' and 'counts'"),
    (dict(segmentation=[[1, 2, 3]]), "segmentation", r">= 6 finite numbers"),
    (dict(segmentation="abc"), "segmentation", r"an RLE .* or a list of polygons"),
    (dict(segmentation=_DROP), "segmentation", r"missing: segm AP needs a mask"),
    (dict(category_id=99), "category_id", r"99 is not a category of the ground truth \(ids \[3, 7\]\)"),
    (dict(category_id="3"), "category_id", r"must be an int, got '3' \(str\)"),
    (dict(image_id=5), "image_id", r"5 is not an image of the ground truth"),
    (dict(image_id=1.0), "image_id", r"must be an int, got 1.0 \(float\)"),
])
def test_each_bad_field_is_named_with_the_detection_index(changes, field, message):
    results = [_det(), _det(image_id=2, segmentation=_rle(8, 8, 1, 4, 1, 4), bbox=[1, 1, 3, 3]), _det(**changes)]
    with pytest.raises(ValueError, match=rf"^results file r.json\[2\] \({field}\): (.* )?{message}"):
        validate_coco_results(results, GT, ("bbox", "segm"), where="results file r.json")


def test_bad_containers_and_iou_types():
    with pytest.raises(ValueError, match=r"coco_results\[0\] \(detection\): must be an object"):
        validate_coco_results([[1, 2]], GT)
    with pytest.raises(TypeError, match="must be a list of detections, got dict"):
        validate_coco_results({"image_id": 1}, GT)
    with pytest.raises(ValueError, match="iou_type must be 'bbox' or 'segm'"):
        validate_coco_results([], GT, "keypoints")
    with pytest.raises(ValueError, match=r"\[0\] \(bbox\): missing"):
        validate_coco_results([_det(bbox=_DROP, segmentation=_DROP)], GT, "bbox")


def test_takes_a_pycocotools_coco():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = GT
    coco.createIndex()
    with pytest.raises(ValueError, match=r"\[0\] \(score\)"):
        validate_coco_results([_det(score=float("nan"))], coco, "segm")
