"""Tests for istr.engine.evaluate: exact agreement with pycocotools, empty results, evaluate() end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from istr.data import CocoInstances, make_synthetic_coco
from istr.data.coco import load_coco_json
from istr.engine import coco_evaluate, evaluate, predict, results_to_coco

FAKE = Path(__file__).parents[3] / "shared" / "data" / "cocoapi_fake_segm"

# /work/shared/data/cocoapi_fake_segm/README.md (pycocotools 2.0.11 on the 347 detections of the 45 GT images)
REFERENCE = {
    "segm": [0.3598, 0.6019, 0.3469, 0.3857, 0.3551, 0.3822, 0.2931, 0.4127, 0.4139, 0.4403, 0.3820, 0.3989],
    "bbox": [0.5097, 0.7243, 0.5713, 0.5021, 0.5297, 0.5290, 0.4094, 0.5584, 0.5597, 0.5478, 0.5480, 0.5470],
}
NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@pytest.fixture(scope="module")
def fixture_results():
    """The fixture's detections as the model would output them: per image boxes/labels/scores/soft masks."""
    if not (FAKE / "gt_instances_for_fakesegm.json").is_file():
        pytest.skip(f"cocoapi fake-segm fixture not found at {FAKE}")
    gt = load_coco_json(FAKE / "gt_instances_for_fakesegm.json")
    detections = json.loads((FAKE / "instances_val2014_fakesegm100_results.json").read_text())
    detections = [d for d in detections if d["image_id"] in set(gt.getImgIds())]
    assert len(detections) == 347
    label_to_category_id = sorted(gt.getCatIds())
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    results, image_ids = [], []
    for image_id, dets in by_image.items():
        rles = [d["segmentation"] for d in dets]
        masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)[:, None].float()  # [N, 1, H, W]
        boxes = torch.tensor(mask_utils.toBbox(rles), dtype=torch.float32)  # the masks' boxes, as loadRes makes
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([label_to_category_id.index(d["category_id"]) for d in dets])
        results.append({"boxes": boxes, "labels": labels, "scores": torch.tensor([d["score"] for d in dets]),
                        "masks": masks})  # fmt: skip
        image_ids.append(image_id)
    return gt, results, image_ids, label_to_category_id


def test_reproduces_pycocotools_fixture_exactly(fixture_results):
    gt, results, image_ids, label_to_category_id = fixture_results
    coco_results = results_to_coco(results, image_ids, label_to_category_id)
    assert len(coco_results) == 347 and isinstance(coco_results[0]["segmentation"]["counts"], str)
    metrics = coco_evaluate(gt, coco_results)
    assert [round(metrics["segm"][n], 4) for n in NAMES] == REFERENCE["segm"]
    # bbox: the README's boxes come from loadRes on mask-only results, so detections' areas are mask areas.
    # By default (detectron2 convention) the results' boxes are kept and their box area splits s/m/l, which only
    # changes APs/APm/APl; every other number is identical. bbox_area="mask" reproduces all twelve.
    same = [n for n in NAMES if n not in ("APs", "APm", "APl")]
    assert [round(metrics["bbox"][n], 4) for n in same] == [REFERENCE["bbox"][NAMES.index(n)] for n in same]
    assert round(metrics["bbox"]["AP"], 4) == 0.5097 and round(metrics["segm"]["AP"], 4) == 0.3598
    exact = coco_evaluate(gt, coco_results, iou_types=("bbox",), bbox_area="mask", per_category=True)
    assert [round(exact["bbox"][n], 4) for n in NAMES] == REFERENCE["bbox"]
    per_category = exact["bbox"]["per_category"]  # AP is the mean over categories that have GT
    assert len(per_category) == 80 and "person" in per_category
    assert np.nanmean(list(per_category.values())) == pytest.approx(exact["bbox"]["AP"], abs=1e-12)
    assert "bbox" in coco_results[0]  # coco_evaluate worked on copies: inputs not mutated by loadRes
    assert "area" not in coco_results[0] and "id" not in coco_results[0]


def test_empty_and_invalid_results(fixture_results):
    gt = fixture_results[0]
    metrics = coco_evaluate(gt, [])
    assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0
    good = {"image_id": gt.getImgIds()[0], "category_id": 1, "score": 0.5, "bbox": [0, 0, 5, 5]}
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_evaluate(gt, [dict(good, image_id=-7)], iou_types=("bbox",))
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(gt, [dict(good, category_id=1234)], iou_types=("bbox",))
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(gt, [good], iou_types=("segm",))


def test_results_to_coco_conversion():
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.7
    masks[1, 0, 4, 0] = 0.49  # below the 0.5 threshold: empty mask
    result = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 1.0, 5.0]]), "labels": torch.tensor([1, 0]),
              "scores": torch.tensor([0.9, 0.2]), "masks": masks}  # fmt: skip
    out = results_to_coco([result], [42], {0: 3, 1: 17})
    assert [o["category_id"] for o in out] == [17, 3] and out[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert out[0]["image_id"] == 42 and out[0]["score"] == pytest.approx(0.9)
    decoded = mask_utils.decode(out[0]["segmentation"])
    assert decoded.shape == (6, 8) and decoded.sum() == 6 and mask_utils.decode(out[1]["segmentation"]).sum() == 0
    assert results_to_coco([{**result, "labels": torch.tensor([0, 0])}], [1], [5])[0]["category_id"] == 5
    with pytest.raises(ValueError, match="label 1"):
        results_to_coco([result], [42], [3])
    with pytest.raises(ValueError, match="2 results but 1"):
        results_to_coco([result, result], [1], [3, 4])


# ------------------------------------------------------------------------------------------- evaluate()
class OracleModel(torch.nn.Module):
    """Fake model for evaluate(): returns the ground truth of each image it recognises (all_stages: stage 0 is
    the GT with every box and mask shifted, stage 1 the exact GT)."""

    def __init__(self, dataset: CocoInstances) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.truth = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            self.truth[self.key(image)] = target

    @staticmethod
    def key(image: torch.Tensor) -> tuple:
        return (*image.shape, round(float(image.double().sum()), 3))

    def forward(self, images, all_stages=False):
        assert not self.training and not torch.is_grad_enabled()
        exact, shifted = [], []
        for image in images:
            t = self.truth[self.key(image)]
            n = len(t["labels"])
            masks = t["masks"][:, None].float()
            exact.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n),
                          "masks": masks})  # fmt: skip
            shifted.append({**exact[-1], "boxes": t["boxes"] + 6.0, "masks": masks.roll(shifts=(6, 6), dims=(2, 3))})
        return [shifted, exact] if all_stages else exact


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory) -> CocoInstances:
    paths = make_synthetic_coco(tmp_path_factory.mktemp("ev"), num_train=0, num_val=6, image_size=(96, 112), seed=3)
    return CocoInstances(paths["val_images"], paths["val_annotations"], include_empty=True)


def test_evaluate_with_oracle_model(synth_val, tmp_path):
    model = OracleModel(synth_val).train()
    metrics = evaluate(model, synth_val, batch_size=4, results_path=tmp_path / "res" / "results.json", progress=False)
    assert model.training  # mode restored
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "res" / "results.json").read_text())
    assert len(written) == synth_val.stats["instances"]
    assert {r["category_id"] for r in written} <= set(synth_val.label_to_category_id)
    again = coco_evaluate(synth_val.coco, written)  # the written json scores the same
    assert again["segm"]["AP"] == pytest.approx(1.0)

    staged = evaluate(model, synth_val, all_stages=True, progress=False)
    assert len(staged["stages"]) == 2 and staged["segm"] == staged["stages"][-1]["segm"]
    assert staged["stages"][0]["segm"]["AP"] < 0.5 < staged["stages"][1]["segm"]["AP"] == pytest.approx(1.0)

    subset = torch.utils.data.Subset(synth_val, [1, 3])
    part = evaluate(model, subset, progress=False, iou_types=("segm",))
    assert set(part) == {"segm"} and part["segm"]["AP"] == pytest.approx(1.0)


def _distributed_worker(rank: int, world: int, store: str, images: str, ann: str, out: str) -> None:
    import torch.distributed as dist

    from istr.engine.distributed import cleanup_distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        dataset = CocoInstances(images, ann, include_empty=True)
        subset = torch.utils.data.Subset(dataset, [0, 1, 2, 3, 5])  # 5 images on 2 ranks: the sampler pads one
        metrics = evaluate(OracleModel(dataset), subset, progress=False, results_path=f"{out}/results.json")
        torch.save(metrics, f"{out}/metrics{rank}.pt")
    finally:  # the ranks leave together (barrier); if one raised, start_processes stops the other
        cleanup_distributed()


def test_evaluate_under_torch_distributed(synth_val, tmp_path):
    """Two gloo ranks each score a shard; rank 0 gathers (dropping the sampler's padding) and both get the result."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    args = (2, str(tmp_path / "store"), str(synth_val.image_dir), str(synth_val.ann_file), str(tmp_path))
    mp.start_processes(_distributed_worker, args=args, nprocs=2, join=True, start_method="fork")  # no re-imports
    m0, m1 = (torch.load(tmp_path / f"metrics{r}.pt") for r in (0, 1))
    assert m0 == m1 and m0["segm"]["AP"] == pytest.approx(1.0) and m0["bbox"]["AP"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "results.json").read_text())
    ids = [synth_val.ids[i] for i in (0, 1, 2, 3, 5)]
    assert sorted({r["image_id"] for r in written}) == sorted(ids)
    assert len(written) == sum(len(synth_val.coco.imgToAnns[i]) for i in ids)  # no duplicates from padding


def test_predict_helper(synth_val):
    model = OracleModel(synth_val)
    single = predict(model, synth_val.image_path(0))
    assert set(single) == {"boxes", "labels", "scores", "masks"} and single["masks"].shape[-2:] == (96, 112)
    many = predict(model, [synth_val.get_image(1), synth_val.image_path(2)], score_threshold=0.9)
    assert len(many) == 2 and all(bool((r["scores"] >= 0.9).all()) for r in many)
    expected = int((torch.linspace(1.0, 0.5, len(synth_val[1][1]["labels"])) >= 0.9).sum())
    assert len(many[0]["masks"]) == len(many[0]["labels"]) == expected
    stages = predict(model, synth_val.image_path(0), all_stages=True)
    assert len(stages) == 2 and torch.equal(stages[1]["boxes"], single["boxes"])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        predict(model, torch.zeros(2, 5, 5))
    assert np.isfinite(single["scores"].numpy()).all()


def test_evaluate_real_untrained_model(synth_val, tmp_path):
    """The library's own model through evaluate(all_stages=True): contract check, not an accuracy check."""
    import istr

    torch.manual_seed(0)
    model = istr.create_model("istr_tiny", num_classes=synth_val.num_classes, codec_name="dct",
                              codec_config={"mask_size": 28, "dim": 60}, min_size=96, max_size=128)  # fmt: skip
    metrics = evaluate(model, synth_val, batch_size=2, all_stages=True, progress=False, results_path=tmp_path / "r.json")
    assert len(metrics["stages"]) == model.num_stages and metrics["segm"] == metrics["stages"][-1]["segm"]
    for stage in metrics["stages"]:
        assert all(0.0 <= stage[t]["AP"] <= 1.0 for t in ("bbox", "segm"))
    written = json.loads((tmp_path / "r.json").read_text())
    assert written and all(r["category_id"] in synth_val.label_to_category_id for r in written)
    assert metrics["segm"]["AP"] < 0.5  # an untrained model must not look good
