"""Shared pytest fixtures: the ../shared data folder (skipped with a reason when absent) and small real mask sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the CPU is shared: keep every test process to one intra-op thread unless told otherwise
torch.set_num_threads(int(os.environ.get("ISTR_TEST_THREADS", "1")))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    # pycocotools 2.0.x with numpy 2 warns on every mask decode; it is harmless and not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is missing (tests expect ../shared beside the repo root)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the repository (data, papers, reference); skips the test if it is absent."""
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def coco_pool_dir(shared_dir: Path) -> Path:
    """../shared/data/coco_masks_pool: real COCO instance annotations (no images) for codec work."""
    return _require(shared_dir / "data" / "coco_masks_pool")


@pytest.fixture(scope="session")
def coco_pool_train_json(coco_pool_dir: Path) -> Path:
    return _require(coco_pool_dir / "instances_pool_train2017.json")


@pytest.fixture(scope="session")
def coco_pool_val_json(coco_pool_dir: Path) -> Path:
    return _require(coco_pool_dir / "instances_pool_val2017.json")


def load_real_instances(ann_file: Path, max_instances: int, *, with_full_masks: bool = False) -> dict:
    """The first `max_instances` non-crowd annotations of a COCO json (images in id order).

    Returns {"coco", "anns", "boxes" float [N, 4] xyxy, "sizes" list of (H, W),
             "full" (only with_full_masks) list of uint8 [H, W] numpy masks from COCO.annToMask}.
    """
    from pycocotools.coco import COCO

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        coco = COCO(str(ann_file))
    anns, sizes = [], []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        for ann in coco.imgToAnns[img_id]:
            if ann.get("iscrowd", 0):
                continue
            anns.append(ann)
            sizes.append((img["height"], img["width"]))
            if len(anns) == max_instances:
                break
        if len(anns) == max_instances:
            break
    boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=torch.float32)
    out = {"coco": coco, "anns": anns, "boxes": boxes, "sizes": sizes}
    if with_full_masks:
        out["full"] = [coco.annToMask(a) for a in anns]
    return out


@pytest.fixture(scope="session")
def real_grids_28(coco_pool_train_json: Path, coco_pool_val_json: Path) -> dict[str, torch.Tensor]:
    """Small real slices cropped by GT box to 28x28 soft grids: {"train": [400, 28, 28], "val": [200, 28, 28]}."""
    from istr.ops import crop_masks

    out = {}
    for split, path, n in (("train", coco_pool_train_json, 400), ("val", coco_pool_val_json, 200)):
        data = load_real_instances(path, n, with_full_masks=True)
        out[split] = torch.cat([crop_masks(torch.from_numpy(m)[None], b[None], 28)
                                for m, b in zip(data["full"], data["boxes"])])
    return out


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every time.sleep(seconds) made during the test, recorded and skipped: a retry loop (huggingface_hub's
    backoff sleeps between tries) shows up here whatever the machine's speed."""
    import time

    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", lambda seconds: calls.append(float(seconds)))
    return calls
