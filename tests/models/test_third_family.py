"""A third model family added from outside the package, with new files only: it registers its architecture and a preset
(with a recipe and demo settings) and runs through the Python API, save/load, the demo and the CLI like ISTR and ISDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import istr

ROOT = Path(__file__).resolve().parents[2]

# The whole family: one file a researcher writes in their own project (nothing in istr/ is edited).
TOY_FAMILY = textwrap.dedent('''
    """toyboxes: a box-only DETR-lite (one linear class and box head per query over the image's pooled features);
    its masks are its boxes filled. Small, but a complete family."""
    import torch
    from torch import nn
    from torchvision.ops import box_convert

    from istr.io import register_architecture
    from istr.models import ImageTransform, register_preset
    from istr.models.base import DetectionModel, check_backbone, check_positive_ints, topk_over_classes
    from istr.models.zoo import backbone_from_options, build_criterion

    TERMS = {"focal": 2.0, "l1": 5.0, "giou": 2.0}


    @register_architecture("toyboxes")
    class ToyBoxes(DetectionModel):
        def __init__(self, backbone, num_classes=80, *, criterion=None, num_queries=10, hidden_dim=32,
                     detections_per_image=10, mask_threshold=None, min_size=64, max_size=64, train_min_sizes=None,
                     size_divisible=32):
            super().__init__()
            check_positive_ints(num_classes=num_classes, num_queries=num_queries, hidden_dim=hidden_dim,
                                detections_per_image=detections_per_image)
            check_backbone(backbone, hidden_dim)
            self.backbone, self.criterion, self.num_classes = backbone, criterion, num_classes
            self.detections_per_image, self.mask_threshold = detections_per_image, mask_threshold
            self.transform = ImageTransform(min_size, max_size, train_min_sizes, size_divisible)
            self.queries = nn.Embedding(num_queries, hidden_dim)
            self.class_head, self.box_head = nn.Linear(hidden_dim, num_classes), nn.Linear(hidden_dim, 4)

        def forward(self, images, targets=None, all_stages=False):
            images, original_sizes = self.check_call(images, targets, all_stages, self.queries.weight.device)
            if not self.training:
                return self.grouped_inference(self._infer, images, all_stages)
            batch, sizes = self.transform(images)
            outputs = self._predict(batch, sizes)
            prepared = [{"boxes": ImageTransform.scale_boxes(t["boxes"].float(), o, s), "labels": t["labels"],
                         "image_size": torch.tensor(s, dtype=torch.float32)}
                        for t, o, s in zip(targets, original_sizes, sizes)]
            return self.criterion([outputs], prepared, None)

        def _predict(self, batch, sizes):
            pooled = self.backbone(batch)[-1].mean((2, 3))  # [B, d]
            queries = self.queries.weight[None] + pooled[:, None]
            wh = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=batch.dtype)
            boxes = box_convert(self.box_head(queries).sigmoid(), "cxcywh", "xyxy") * wh[:, None]
            return {"logits": self.class_head(queries), "boxes": boxes}

        def _infer(self, images, all_stages):
            original_sizes = [tuple(i.shape[-2:]) for i in images]
            batch, sizes = self.transform(images)
            out = self._predict(batch, sizes)
            scores, labels, query = topk_over_classes(out["logits"], self.detections_per_image)
            results = []
            for b, (size, (h, w)) in enumerate(zip(sizes, original_sizes)):
                boxes = ImageTransform.scale_boxes(out["boxes"][b, query[b]], size, (h, w))
                boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                     boxes[:, 3].clamp(0, h)], 1)
                ys, xs = torch.arange(h)[None, :, None] + 0.5, torch.arange(w)[None, None, :] + 0.5
                masks = ((xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
                         & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])).float()
                results.append({"boxes": boxes, "labels": labels[b], "scores": scores[b], "masks": masks[:, None]})
            return [results] if all_stages else results


    def build_toy(*, num_classes=80, pretrained=False, backbone="resnet18", timm_kwargs=None, costs=None, losses=None,
                  **kwargs):
        backbone = backbone_from_options(backbone, out_channels=kwargs.get("hidden_dim", 32), pretrained=pretrained,
                                         timm_kwargs=timm_kwargs)
        return ToyBoxes(backbone, num_classes, criterion=build_criterion(num_classes, costs=costs, losses=losses,
                                                                         default_costs=TERMS, default_losses=TERMS),
                        **kwargs)


    DEMO = {"model": {}, "train": dict(lr=1e-3, backbone_lr_mult=1.0, batch_size=4, iters=6, warmup_iters=0,
                                       decay_at=0.8, gamma=0.1, clip_grad_norm=1.0, flip=True),
            "description": "toyboxes (`{preset}`: {num_queries} queries)"}
    register_preset("toy_tiny", build_toy, family="toyboxes", recipe={"lr": 1e-3, "warmup_iters": 0}, demo=DEMO,
                    timm_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16})
''')


@pytest.fixture(scope="module")
def toy_family(tmp_path_factory):
    """The family module written into a folder of its own and imported, as user code is."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "toy_family.py").write_text(TOY_FAMILY)
    sys.path.insert(0, str(folder))
    try:
        import toy_family  # noqa: F401 (registers the family)
        yield folder
    finally:
        sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from istr.data import make_synthetic_coco

    root = tmp_path_factory.mktemp("toy_data")
    make_synthetic_coco(root, num_train=8, num_val=4, image_size=64, difficulty="easy", seed=0)
    return root


def test_registered_like_a_builtin_family(toy_family):
    assert "toy_tiny" in istr.list_models() and "toy_tiny" in istr.models.list_models(demo=True)
    info = istr.models.preset_info("toy_tiny")
    assert info.family == "toyboxes" and info.recipe == {"lr": 1e-3, "warmup_iters": 0}
    model = istr.create_model("toy_tiny", num_classes=3)
    assert model.preset == "toy_tiny" and model.recipe == {"lr": 1e-3, "warmup_iters": 0}


def test_trains_evaluates_predicts_and_round_trips_through_the_api(toy_family, shapes, tmp_path):
    from istr.data import CocoInstances
    from istr.engine import TrainConfig, evaluate, predict, train

    train_set = CocoInstances(shapes / "train", shapes / "annotations" / "instances_train.json")
    val_set = CocoInstances(shapes / "val", shapes / "annotations" / "instances_val.json", include_empty=True)
    torch.manual_seed(0)
    model = istr.create_model("toy_tiny", num_classes=train_set.num_classes)
    train(model, train_set, TrainConfig(max_iters=3, batch_size=2, checkpoint_every=0, progress=False,
                                        eval_at_end=False), out_dir=tmp_path / "run")
    metrics = evaluate(model, val_set, progress=False)
    assert 0 <= metrics["segm"]["AP"] <= 1 and 0 <= metrics["bbox"]["AP"] <= 1
    istr.save_model(model, tmp_path / "toy.safetensors")
    loaded = istr.load_model(tmp_path / "toy.safetensors")
    assert type(loaded).__name__ == "ToyBoxes" and loaded.config() == model.config()
    image = val_set[0][0]
    a, b = predict(model.eval(), image), predict(loaded, image)
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_runs_the_demo(toy_family, tmp_path):
    from istr.demo import run_demo

    report = run_demo(tmp_path / "demo", model="toy_tiny", num_train=8, num_val=4, image_size=64, threads=1,
                      progress=False, overlays=1)
    assert report["iterations"] == 6 and report["model"]["preset"] == "toy_tiny"
    assert report["codec_reconstruction_iou"] is None  # no codec in this family
    assert (tmp_path / "demo" / "report.md").read_text().count("toyboxes (`toy_tiny`: 10 queries)") == 1


def _cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`istr ...` in a fresh process that imports the user's family first (as `python -m istr` would after it)."""
    code = "import sys, toy_family; from istr.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_runs_through_the_cli(toy_family, shapes, tmp_path):
    ann = shapes / "annotations"
    run = tmp_path / "run"
    done = _cli(toy_family, "train", "--model", "toy_tiny", "--train-images", str(shapes / "train"), "--train-ann",
                str(ann / "instances_train.json"), "--val-images", str(shapes / "val"), "--val-ann",
                str(ann / "instances_val.json"), "--max-iters", "3", "--batch-size", "2", "--out", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert "toy_tiny" in json.dumps(record)
    done = _cli(toy_family, "eval", str(run), "--out", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli(toy_family, "predict", str(run), str(next((shapes / "val").iterdir())), "--out", str(tmp_path / "pred"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_shared_files_name_no_family():
    """The engine, the CLI and the demo find families and presets through the registry only."""
    files = [*(ROOT / "istr" / "engine").glob("*.py"), *(ROOT / "istr").glob("cli*.py"), ROOT / "istr" / "demo.py"]
    assert len(files) > 10
    for path in files:
        text = path.read_text().lower()
        for name in ("isda", "istr_tiny", "istr_r50", "build_istr"):
            assert name not in text, f"{path.relative_to(ROOT)} names {name!r}"
