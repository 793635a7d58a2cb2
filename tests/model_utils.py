"""Model helpers shared by the model tests: a tiny ISTR, a two-image batch with rectangle instances, the results
contract check."""
from __future__ import annotations

import torch

import istr
from istr.models import ISTR, create_model


TINY = dict(backbone="resnet18", num_queries=8, num_stages=2, hidden_dim=32, dynamic_dim=8, ffn_dim=64, num_heads=4,
            detections_per_image=10, min_size=64, max_size=96, train_min_sizes=(64,))


def tiny_model(num_classes: int = 3, codec: istr.MaskCodec | None = None, **overrides) -> ISTR:
    torch.manual_seed(0)
    codec = codec if codec is not None else istr.create_codec("dct", mask_size=16, dim=12)
    return create_model("istr_tiny", num_classes=num_classes, codec=codec, **{**TINY, **overrides})


def make_batch(num_classes: int = 3, empty: bool = False):
    """Two images of different sizes with rectangle instances (full-image uint8 masks, boxes, labels)."""
    g = torch.Generator().manual_seed(1)
    images, targets = [torch.rand(3, 60, 80, generator=g), torch.rand(3, 72, 56, generator=g)], []
    specs = [[(5, 10, 40, 50), (30, 2, 78, 30)], [(10, 20, 50, 70)]]
    for img, rects in zip(images, specs):
        h, w = img.shape[1:]
        rects = [] if empty else rects
        masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(rects):
            masks[i, y0:y1, x0:x1] = 1
            img[:, y0:y1, x0:x1] = 0.8
        targets.append({"boxes": torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.arange(len(rects), dtype=torch.int64) % num_classes, "masks": masks})
    return images, targets


def check_results(results, images, max_dets: int) -> None:
    assert len(results) == len(images)
    for res, img in zip(results, images):
        h, w = img.shape[1:]
        assert set(res) == {"boxes", "labels", "scores", "masks"}
        n = res["boxes"].shape[0]
        assert 0 < n <= max_dets
        assert res["boxes"].shape == (n, 4) and res["boxes"].dtype == torch.float32
        assert res["labels"].shape == (n,) and res["labels"].dtype == torch.int64
        assert res["scores"].shape == (n,) and res["scores"].dtype == torch.float32
        assert res["masks"].shape == (n, 1, h, w) and res["masks"].dtype == torch.float32
        b = res["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert res["masks"].min() >= 0 and res["masks"].max() <= 1
        assert ((res["scores"] > 0) & (res["scores"] < 1)).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()  # sorted, best first
        assert (res["labels"] >= 0).all() and (res["labels"] < 3).all()
