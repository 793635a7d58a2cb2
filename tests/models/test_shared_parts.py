"""What the families share and what each prepares around its network: strict constructor values, the config round
trip, top-k over K x C, target preparation (ISTR's box-grid targets, ISDA's mask-map targets) and the
detections-to-results steps (ISTR's paste-back, ISDA's mask maps), each against an independent computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import istr
from istr.models.base import topk_over_classes
from istr.models.isda.results import map_results
from istr.models.isda.targets import mask_targets
from istr.models.istr.results import paste_results
from istr.models.istr.targets import box_targets
from istr.models.targets import check_targets
from istr.ops.masks import crop_masks, paste_masks


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask_position="False"), r"mask_position \(ISDA\) must be a bool .*'False' \(str\)"),
    (dict(mask_stride="4"), r"mask_stride \(ISDA\) must be an int, got '4' \(str\)"),
    (dict(num_queries=4.0), r"num_queries \(ISDA\) must be an int, got 4.0 \(float\)"),
    (dict(dropout=float("nan")), r"dropout \(ISDA\) must be a finite number"),
    (dict(mask_threshold=True), r"mask_threshold \(ISDA\) must be a number"),
])
def test_constructor_values_are_strict(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        istr.create_model("isda_tiny", num_classes=3, **kwargs)


def test_the_constructor_arguments_are_the_config_and_live_options_are_read_back():
    codec = istr.create_codec("dct", mask_size=16, dim=12)
    model = istr.create_model("istr_tiny", num_classes=3, codec=codec, num_queries=7, min_size=64, max_size=64)
    model.detections_per_image, model.mask_threshold = 5, 0.4  # changed after construction: saved as changed
    cfg = model.config()
    assert cfg["num_queries"] == 7 and cfg["detections_per_image"] == 5 and cfg["mask_threshold"] == 0.4
    assert cfg["codec"] == {"name": "dct", "config": codec.config()} and cfg["preset"] == "istr_tiny"
    rebuilt = type(model).from_config(cfg)
    assert rebuilt.config() == cfg
    # an older file: a renamed argument and one added since (its default fills in)
    old = {k: v for k, v in istr.create_model("isda_tiny", num_classes=3).config().items()
           if k not in ("kernel_dim", "mask_feat_init_std")}
    old["mask_dim"] = 32
    upgraded = istr.ISDA.upgrade_config(old)
    assert upgraded["kernel_dim"] == 32 and "mask_dim" not in upgraded and upgraded["mask_feat_init_std"] == 0.01


def test_topk_over_classes_matches_brute_force():
    logits = torch.randn(2, 5, 3)
    scores, labels, query = topk_over_classes(logits, 4)
    for b in range(2):
        pairs = sorted(((float(torch.sigmoid(logits[b, q, c])), q, c) for q in range(5) for c in range(3)), reverse=True)
        assert [(q, c) for _, q, c in pairs[:4]] == list(zip(query[b].tolist(), labels[b].tolist()))
        torch.testing.assert_close(scores[b], torch.tensor([s for s, _, _ in pairs[:4]]))
    assert topk_over_classes(logits, 100)[0].shape == (2, 15)  # k capped at Q x C


def _targets():
    masks = torch.zeros(2, 40, 60, dtype=torch.uint8)
    masks[0, 5:25, 10:40] = 1
    masks[1, 20:38, 30:58] = 1
    return [{"boxes": torch.tensor([[10.0, 5, 40, 25], [30, 20, 58, 38]]), "labels": torch.tensor([0, 2]),
             "masks": masks}]


def test_check_targets_names_the_image_and_the_problem():
    good = _targets()
    check_targets(good, [(40, 60)], num_classes=3)
    bad = [{**good[0], "labels": torch.tensor([0, 3])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 3\)"):
        check_targets(bad, [(40, 60)], num_classes=3)
    with pytest.raises(ValueError, match=r"must be \[2, 40, 61\] .*got \(2, 40, 60\)"):
        check_targets(good, [(40, 61)], num_classes=3)


def test_istr_box_targets_crop_by_the_gt_boxes_and_rescale_them():
    targets = _targets()
    prepared = box_targets(targets, [(40, 60)], [(80, 120)], mask_size=14, device="cpu")[0]
    torch.testing.assert_close(prepared["mask_grids"], crop_masks(targets[0]["masks"], targets[0]["boxes"], 14))
    torch.testing.assert_close(prepared["boxes"], targets[0]["boxes"] * 2)  # resized 2x
    assert prepared["image_size"].tolist() == [80.0, 120.0] and "mask_embeds" not in prepared
    with pytest.raises(ValueError, match="no 'segmentations'"):
        box_targets(targets, [(40, 60)], [(40, 60)], 14, "cpu", crop="polygon")


def test_isda_mask_targets_are_the_masks_on_the_mask_logits_grid():
    targets = _targets()
    prepared = mask_targets(targets, [(40, 60)], (64, 64), stride=4, device="cpu")[0]
    assert prepared["masks"].shape == (2, 16, 16)
    canvas = torch.zeros(2, 1, 64, 64)
    canvas[:, :, :40, :60] = targets[0]["masks"][:, None].float()
    expected = F.interpolate(canvas, scale_factor=0.25, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(prepared["masks"], expected)


def test_istr_paste_results_clip_drop_and_paste():
    grids = torch.rand(3, 8, 8)
    detections = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [-20, -20, 30, 30], [200, 200, 240, 240]]),
                   "labels": torch.tensor([0, 1, 2]), "scores": torch.tensor([0.9, 0.8, 0.7]), "mask_grids": grids}]
    result = paste_results(detections, [(100, 100)], [(50, 50)])[0]  # the input was resized 2x
    assert result["labels"].tolist() == [0, 1]  # the third box lies outside the image after clipping
    torch.testing.assert_close(result["boxes"], torch.tensor([[5.0, 5, 25, 20], [0, 0, 15, 15]]))
    torch.testing.assert_close(result["masks"][:, 0], paste_masks(grids[:2], result["boxes"], (50, 50)))
    binary = paste_results(detections, [(100, 100)], [(50, 50)], mask_threshold=0.5)[0]["masks"]
    assert set(binary.unique().tolist()) <= {0.0, 1.0}


def test_isda_map_results_resize_crop_and_box_the_masks():
    maps = torch.zeros(2, 8, 8)
    maps[0, 1:4, 2:6] = 1.0  # a block at stride 4 on a 32x32 padded input
    detections = [{"labels": torch.tensor([1, 0]), "scores": torch.tensor([0.9, 0.5]), "mask_maps": maps}]
    result = map_results(detections, [(32, 32)], [(32, 32)], mask_threshold=0.5, mask_stride=4)[0]
    assert result["labels"].tolist() == [1]  # the empty map is dropped
    up = F.interpolate(maps[:1, None], scale_factor=4, mode="bilinear", align_corners=False)[0, 0] >= 0.5
    ys, xs = torch.nonzero(up, as_tuple=True)
    assert result["boxes"][0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert torch.equal(result["masks"][0, 0], up.float())


def _map_results_plainly(detections, sizes, original_sizes, mask_threshold, mask_stride):
    """map_results as first written (upsample, crop, resize, threshold, torchvision's masks_to_boxes): the reference
    for the faster one, which skips a resize to the same size, binarises in place and boxes by rows and columns."""
    from torchvision.ops import masks_to_boxes

    results = []
    for det, size, (h, w) in zip(detections, sizes, original_sizes):
        labels, scores, maps = det["labels"], det["scores"], det["mask_maps"]
        masks = maps.new_zeros((maps.shape[0], h, w))
        if maps.shape[0]:
            up = F.interpolate(maps[:, None].float(), scale_factor=mask_stride, mode="bilinear", align_corners=False)
            masks = F.interpolate(up[:, :, : size[0], : size[1]], size=(h, w), mode="bilinear",
                                  align_corners=False)[:, 0]
        binary = masks >= (0.5 if mask_threshold is None else mask_threshold)
        keep = binary.flatten(1).any(1)
        masks, binary, labels, scores = masks[keep], binary[keep], labels[keep], scores[keep]
        boxes = masks_to_boxes(binary).to(masks.dtype) if len(masks) else masks.new_zeros((0, 4))
        boxes[:, 2:] += 1
        if mask_threshold is not None:
            masks = (masks >= mask_threshold).float()
        results.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks[:, None]})
    return results


@pytest.mark.parametrize("chunk_pixels", [2 ** 22, 3000])  # all masks in one chunk; 1-2 masks per chunk
@pytest.mark.parametrize("threshold", [0.5, 0.3, None])
def test_isda_map_results_equal_the_plain_chain_bit_for_bit(threshold, chunk_pixels, monkeypatch):
    """Same size (the resize skipped), padding cropped, resized down and up, empty maps, no detection at all."""
    from istr.models.isda import results

    monkeypatch.setattr(results, "_CHUNK_PIXELS", chunk_pixels)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 10, 12, generator=g) ** 3  # [0, 1], most of it below 0.5
    maps[1] = 0.2  # empty at any threshold above 0.2
    maps[4, :, 6:] = 0.0  # right half empty
    cases = [([(40, 48)], [(40, 48)]),  # the network ran at the image's size
             ([(37, 45)], [(37, 45)]),  # padded batch: cropped, not resized
             ([(37, 45)], [(25, 30)]),  # resized down
             ([(37, 45)], [(74, 81)])]  # resized up
    for sizes, originals in cases:
        for n in (6, 0):
            detections = [{"labels": torch.arange(n), "scores": torch.linspace(1, 0.5, n),
                           "mask_maps": maps[:n].clone()}]
            got = map_results(detections, sizes, originals, mask_threshold=threshold, mask_stride=4)[0]
            want = _map_results_plainly(detections, sizes, originals, mask_threshold=threshold, mask_stride=4)[0]
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (key, sizes, originals)
                assert torch.equal(got[key], want[key]), (key, sizes, originals, threshold)
            assert torch.equal(detections[0]["mask_maps"], maps[:n])  # the caller's maps are left as they were
