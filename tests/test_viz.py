"""Tests for istr.viz: drawing instances and saving images."""
from __future__ import annotations

import pytest
import torch

from istr.data import load_image
from istr.viz import class_color, draw_instances, save_image


def _scene():
    image = torch.full((3, 60, 80), 0.5)
    masks = torch.zeros(2, 1, 60, 80)
    masks[0, 0, 10:30, 10:40] = 0.9
    masks[1, 0, 40:55, 50:75] = 0.8
    result = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 40.0, 75.0, 55.0]]),
              "labels": torch.tensor([2, 0]), "scores": torch.tensor([0.95, 0.1]), "masks": masks}  # fmt: skip
    return image, result


def test_draw_instances_draws_masks_boxes_and_labels():
    image, result = _scene()
    base = (image * 255).round().to(torch.uint8)
    out = draw_instances(image, result, class_names=["cat", "dog", "star"], score_threshold=0.4)
    assert out.shape == (3, 60, 80) and out.dtype == torch.uint8
    changed = (out != base).any(dim=0)
    assert changed[15:25, 15:35].all()  # inside the drawn mask: tinted
    assert not changed[42:53, 52:73].any()  # the 0.1-score detection is below the threshold
    assert not changed[0:5, 60:80].any()  # far from everything: untouched
    colour = torch.tensor(class_color(2), dtype=torch.float32)
    assert (out[:, 27, 30].float() - (0.5 * colour + 0.5 * 128)).abs().max() <= 1  # alpha-blended class colour
    no_labels = draw_instances(image, result, class_names=["cat", "dog", "star"], draw_labels=False)
    assert (out != no_labels).any()  # the "star 0.95" text was drawn
    everything = draw_instances(image, result, score_threshold=0.0)
    assert (everything != base).any(dim=0)[42:53, 52:73].any()


def test_draw_targets_without_scores_and_empty_results():
    image, result = _scene()
    target = {"boxes": result["boxes"], "labels": result["labels"], "masks": result["masks"][:, 0] > 0.5}
    out = draw_instances(image, target)
    assert (out != (image * 255).round().to(torch.uint8)).any(dim=0)[42:53, 52:73].any()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
             "masks": torch.zeros(0, 1, 60, 80)}  # fmt: skip
    drawn, plain = draw_instances(image, empty), (image * 255).round().to(torch.uint8)
    assert torch.equal(drawn[:, 20:], plain[:, 20:]) and not torch.equal(drawn, plain)  # only the "no detections" note
    with pytest.raises(ValueError, match="masks are"):
        draw_instances(image, {**result, "masks": torch.zeros(2, 1, 10, 10)})


def test_save_image_round_trip(tmp_path):
    image, result = _scene()
    drawn = draw_instances(image, result)
    path = save_image(drawn, tmp_path / "sub" / "vis.png")
    assert torch.equal((load_image(path) * 255).round().to(torch.uint8), drawn)


def test_an_empty_prediction_panel_says_why():
    from istr.viz import draw_instances

    image = torch.full((3, 60, 200), 0.5)
    result = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([0]), "scores": torch.tensor([0.1])}
    panel = draw_instances(image, result, score_threshold=0.4)
    plain = draw_instances(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
    assert (panel[:, :12, :] != plain[:, :12, :]).any()  # the caption is drawn at the top
    assert torch.equal(panel[:, 30:, :], plain[:, 30:, :])  # and nothing else (the 0.1 detection is not drawn)
