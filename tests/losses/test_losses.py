"""Tests for istr.losses: loss terms against hand computations, and SetCriterion (deep supervision, num_boxes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import istr
from istr.losses import DEFAULT_LOSSES, LOSSES, SetCriterion, count_boxes
from istr.matching import HungarianMatcher
from set_utils import hand_giou, rand_boxes

M, L, C, K = 8, 10, 5, 6


@pytest.fixture(scope="module")
def codec():
    return istr.create_codec("dct", mask_size=M, dim=L)


def make_outputs(b: int, g: torch.Generator, k: int = K) -> dict:
    return {"logits": torch.randn(b, k, C, generator=g).requires_grad_(),
            "boxes": torch.stack([rand_boxes(k, g) for _ in range(b)]).requires_grad_(),
            "mask_embeds": (0.3 * torch.randn(b, k, L, generator=g)).requires_grad_()}


def make_targets(sizes: list[int], g: torch.Generator, codec=None, image_sizes=None) -> list[dict]:
    targets = []
    for i, t in enumerate(sizes):
        grids = torch.rand(t, M, M, generator=g)  # soft grids: the dice target binarises them at 0.5
        tgt = {"boxes": rand_boxes(t, g), "labels": torch.randint(0, C, (t,), generator=g), "mask_grids": grids,
               "image_size": torch.tensor(image_sizes[i] if image_sizes else [60.0, 80.0])}
        if codec is not None:
            tgt["mask_embeds"] = codec.encode(grids)
        targets.append(tgt)
    return targets


def test_registry_lists_loss_terms():
    assert {"focal", "l1", "giou", "embed_l2", "embed_smooth_l1", "dice"} <= set(LOSSES.list())
    assert LOSSES.list("embed_*") == ["embed_l2", "embed_smooth_l1"]
    with pytest.raises(KeyError, match="known loss terms"):
        SetCriterion(HungarianMatcher(), {"focal": 1.0, "mse": 1.0}, num_classes=C)


def test_loss_terms_match_hand_computation(codec):
    g = torch.Generator().manual_seed(0)
    outputs = make_outputs(2, g)
    targets = make_targets([3, 2], g, codec, image_sizes=[[60.0, 80.0], [50.0, 120.0]])
    indices = [(torch.tensor([0, 2, 5]), torch.tensor([1, 2, 0])), (torch.tensor([3, 4]), torch.tensor([1, 0]))]
    num_boxes = 4.0
    logits = outputs["logits"].detach().double().numpy()
    boxes = outputs["boxes"].detach().double().numpy()
    embeds = outputs["mask_embeds"].detach().double().numpy()
    want = dict.fromkeys(["focal", "l1", "giou", "embed_l2", "embed_smooth_l1", "dice"], 0.0)
    # focal over all B x K x C logits, one-hot on matched queries
    onehot = np.zeros_like(logits)
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src.tolist(), tgt.tolist()):
            onehot[b, i, targets[b]["labels"][j]] = 1
    for x, y in zip(logits.ravel(), onehot.ravel()):
        p = 1 / (1 + math.exp(-x))
        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        p_t = p * y + (1 - p) * (1 - y)
        want["focal"] += (0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2
    for b, (src, tgt) in enumerate(indices):
        h, w = targets[b]["image_size"].tolist()
        tb = targets[b]["boxes"].double().numpy()
        te = targets[b]["mask_embeds"].double().numpy()
        grids = (targets[b]["mask_grids"].numpy() >= 0.5).astype(np.float64)
        for i, j in zip(src.tolist(), tgt.tolist()):
            want["l1"] += sum(abs(boxes[b, i, c] - tb[j, c]) / (w if c % 2 == 0 else h) for c in range(4))
            want["giou"] += 1 - hand_giou(boxes[b, i], tb[j])
            d = embeds[b, i] - te[j]
            want["embed_l2"] += (d ** 2).sum() / L
            want["embed_smooth_l1"] += np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5).sum() / L
            pm = codec.decode(outputs["mask_embeds"][b, i : i + 1].detach()).double().numpy().ravel()
            tm = grids[j].ravel()
            want["dice"] += 1 - 2 * (pm * tm).sum() / ((pm ** 2).sum() + (tm ** 2).sum() + 1e-5)
    for name, expected in want.items():
        got = LOSSES.get(name)(outputs, targets, indices, codec, num_boxes)
        assert got.ndim == 0 and got.dtype == torch.float32, name
        assert got.item() == pytest.approx(expected / num_boxes, rel=1e-5, abs=1e-6), name


def test_giou_loss_known_value(codec):
    outputs = {"boxes": torch.tensor([[[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 11.0, 11.0]]])}
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0]]), "image_size": torch.tensor([20.0, 20.0])}]
    got = LOSSES.get("giou")(outputs, targets, [(torch.tensor([0]), torch.tensor([0]))], codec, 1.0)
    assert got.item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-6)


@pytest.mark.parametrize("name", ["focal", "l1", "giou", "embed_l2", "embed_smooth_l1", "dice"])
def test_terms_finite_and_connected_without_targets(codec, name):
    g = torch.Generator().manual_seed(1)
    outputs = make_outputs(2, g)
    targets = make_targets([0, 0], g, codec)
    indices = HungarianMatcher()(outputs, targets, codec)
    value = LOSSES.get(name)(outputs, targets, indices, codec, 1.0)
    assert torch.isfinite(value) and value.requires_grad
    if name != "focal":
        assert value.item() == 0.0
    else:  # all K x C logits are negatives
        assert value.item() > 0
    value.backward()


def test_criterion_without_targets_gives_finite_loss_and_gradients(codec):
    g = torch.Generator().manual_seed(2)
    stages = [make_outputs(2, g) for _ in range(2)]
    criterion = SetCriterion(HungarianMatcher(), DEFAULT_LOSSES, num_classes=C)
    losses = criterion(stages, make_targets([0, 0], g), codec)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for outputs in stages:
        for key, tensor in outputs.items():
            assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), key
        assert outputs["logits"].grad.abs().sum() > 0


def test_criterion_keys_total_and_deep_supervision(codec):
    g = torch.Generator().manual_seed(3)
    targets = make_targets([3, 2], g)
    stages = [make_outputs(2, g) for _ in range(3)]
    # make the last stage exact on a permutation of queries: its own matching must find it (l1 = giou = 0)
    with torch.no_grad():
        for b, t in enumerate(targets):
            stages[2]["boxes"][b, [4, 1, 3][: len(t["labels"])]] = t["boxes"]
    criterion = SetCriterion(HungarianMatcher({"l1": 1.0, "giou": 1.0}), DEFAULT_LOSSES, num_classes=C)
    losses = criterion(stages, targets, codec)
    expected_keys = {"loss"} | {f"{n}_s{s}" for n in DEFAULT_LOSSES for s in range(3)}
    assert set(losses) == expected_keys
    components = sum(v for k, v in losses.items() if k != "loss")
    assert losses["loss"].item() == pytest.approx(components.item(), rel=1e-6)
    assert losses["l1_s2"].item() == pytest.approx(0.0, abs=1e-6) and losses["giou_s2"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["l1_s0"].item() > 0.1 and losses["l1_s1"].item() > 0.1
    losses["loss"].backward()
    for s, outputs in enumerate(stages):
        for key, tensor in outputs.items():
            if s == 2 and key == "boxes":  # exact boxes: l1 and giou are at their minimum, zero gradient
                assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
            else:
                assert tensor.grad is not None and tensor.grad.abs().sum() > 0, (s, key)


def test_weighted_components_and_num_boxes_normalisation(codec):
    g = torch.Generator().manual_seed(4)
    outputs = make_outputs(2, g)
    targets = make_targets([3, 2], g)
    matcher = HungarianMatcher()
    losses = SetCriterion(matcher, {"l1": 5.0, "embed_l2": 2.0}, num_classes=C)([outputs], targets, codec)
    with_embeds = [{**t, "mask_embeds": codec.encode(t["mask_grids"])} for t in targets]
    indices = matcher(outputs, with_embeds, codec)
    for name, weight in (("l1", 5.0), ("embed_l2", 2.0)):
        raw_sum = LOSSES.get(name)(outputs, with_embeds, indices, codec, 1.0)  # num_boxes = 1: plain sum
        assert losses[f"{name}_s0"].item() == pytest.approx(weight * raw_sum.item() / 5, rel=1e-6)  # 5 boxes
    assert count_boxes(targets) == 5.0
    assert count_boxes(make_targets([0, 0], g)) == 1.0  # clamped


def test_count_boxes_distributed_mean_over_ranks(monkeypatch):
    import torch.distributed as dist

    reduced = []

    def fake_all_reduce(tensor, op=dist.ReduceOp.SUM):
        reduced.append(tensor.item())
        tensor += 7.0  # the other rank had 7 boxes

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    g = torch.Generator().manual_seed(5)
    assert count_boxes(make_targets([2, 1], g)) == pytest.approx(5.0)  # (3 + 7) / 2
    assert reduced == [3.0]


def test_precomputed_target_embeds_are_used(codec):
    g = torch.Generator().manual_seed(6)
    outputs = make_outputs(2, g)
    targets = make_targets([2, 1], g, codec)
    shifted = [{**t, "mask_embeds": t["mask_embeds"] + 1.0} for t in targets]
    criterion = SetCriterion(HungarianMatcher({"l1": 1.0}), {"embed_l2": 1.0}, num_classes=C)
    plain = criterion([outputs], targets, None)["loss"]  # no codec needed: embeddings given
    assert criterion([outputs], shifted, None)["loss"].item() != pytest.approx(plain.item())
    bare = [{k: v for k, v in t.items() if k != "mask_embeds"} for t in targets]
    assert criterion([outputs], bare, codec)["loss"].item() == pytest.approx(plain.item(), rel=1e-6)


def test_loss_variants_are_one_dict_change(codec):
    """Paper Table 1c (and ISTR v2's loss) by editing the losses dict only."""
    g = torch.Generator().manual_seed(7)
    outputs, targets = make_outputs(2, g), make_targets([2, 3], g)
    base = {"focal": 2.0, "l1": 5.0, "giou": 2.0}
    for extra in ({"embed_l2": 2.0}, {"dice": 2.0}, {"embed_l2": 2.0, "dice": 2.0}, {"embed_smooth_l1": 1.0, "dice": 5.0}):
        losses = SetCriterion(HungarianMatcher(), {**base, **extra}, num_classes=C)([outputs], targets, codec)
        assert set(losses) == {"loss"} | {f"{n}_s0" for n in {**base, **extra}}
        assert torch.isfinite(losses["loss"])


def test_criterion_input_checks(codec):
    g = torch.Generator().manual_seed(8)
    outputs = make_outputs(2, g)
    criterion = SetCriterion(HungarianMatcher(), num_classes=C)
    bad = make_targets([2, 1], g)
    bad[1]["labels"] = torch.tensor([C])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        criterion([outputs], bad, codec)
    with pytest.raises(ValueError, match="num_classes=7"):
        SetCriterion(HungarianMatcher(), num_classes=7)([outputs], make_targets([1, 1], g), codec)
    with pytest.raises(ValueError, match="2 images"):
        criterion([outputs], make_targets([1], g), codec)
    wrong = make_targets([2, 1], g)
    wrong[0]["labels"] = wrong[0]["labels"].int()
    with pytest.raises(TypeError, match="int64"):
        criterion([outputs], wrong, codec)
    with pytest.raises(ValueError, match="finite number"):
        SetCriterion(HungarianMatcher(), {"focal": float("inf")}, num_classes=C)


def test_loss_under_autocast_is_float32(codec):
    g = torch.Generator().manual_seed(9)
    outputs, targets = make_outputs(2, g), make_targets([2, 3], g)
    criterion = SetCriterion(HungarianMatcher(), num_classes=C)
    plain = criterion([outputs], targets, codec)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_inputs = {k: v.bfloat16() for k, v in outputs.items()}
        mixed = criterion([half_inputs], targets, codec)["loss"]
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=0.02)


def test_mask_terms_match_hand_computation():
    """ISDA's mask terms on mask logits: dice (the authors') and per-pixel BCE (an option), against float64 loops."""
    g = torch.Generator().manual_seed(3)
    outputs = {"mask_logits": torch.randn(2, 4, 5, 6, generator=g).requires_grad_()}
    targets = [{"masks": (torch.rand(t, 5, 6, generator=g) > 0.5).float()} for t in (2, 1)]
    indices = [(torch.tensor([3, 0]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    want = {"mask_dice": 0.0, "mask_bce": 0.0}
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src.tolist(), tgt.tolist()):
            x = outputs["mask_logits"][b, i].detach().double().numpy().ravel()
            t = targets[b]["masks"][j].double().numpy().ravel()
            p = 1 / (1 + np.exp(-x))
            want["mask_dice"] += 1 - 2 * (p * t).sum() / ((p ** 2).sum() + 1e-3 + (t ** 2).sum() + 1e-3)
            want["mask_bce"] += np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
    for name, expected in want.items():
        got = LOSSES.get(name)(outputs, targets, indices, None, 2.0)
        assert got.item() == pytest.approx(expected / 2.0, rel=1e-5), name
        got.backward()
    empty = [(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))] * 2
    assert LOSSES.get("mask_bce")(outputs, [{"masks": torch.zeros(0, 5, 6)}] * 2, empty, None, 1.0).item() == 0.0
