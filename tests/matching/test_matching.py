"""Tests for istr.matching: cost terms against hand computations, and the Hungarian matcher against brute force."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import istr
from istr.matching import COSTS, DEFAULT_COSTS, HungarianMatcher, register_cost
from set_utils import hand_giou, rand_boxes

M, L, C = 8, 10, 5


@pytest.fixture(scope="module")
def codec():
    return istr.create_codec("dct", mask_size=M, dim=L)


def make_batch(num_targets: list[int], k: int, codec, seed: int = 0, with_embeds: bool = True):
    g = torch.Generator().manual_seed(seed)
    b = len(num_targets)
    outputs = {"logits": torch.randn(b, k, C, generator=g),
               "boxes": torch.stack([rand_boxes(k, g) for _ in range(b)]),
               "mask_embeds": torch.randn(b, k, L, generator=g)}
    targets = []
    for t in num_targets:
        grids = torch.rand(t, M, M, generator=g)  # soft: the dice cost binarises at 0.5
        tgt = {"boxes": rand_boxes(t, g), "labels": torch.randint(0, C, (t,), generator=g),
               "mask_grids": grids, "image_size": torch.tensor([60.0, 80.0])}
        if with_embeds:
            tgt["mask_embeds"] = codec.encode(grids)
        targets.append(tgt)
    return outputs, targets


def image(outputs: dict, b: int) -> dict:
    return {k: v[b] for k, v in outputs.items()}


# ----------------------------------------------------------------------------- cost terms, by hand
def test_registry_lists_cost_terms():
    assert {"focal", "l1", "giou", "cosine", "embed_l1", "dice"} <= set(COSTS.list())
    assert COSTS.list("embed*") == ["embed_l1"]
    with pytest.raises(KeyError, match="known cost terms"):
        HungarianMatcher({"focal": 1.0, "nope": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        HungarianMatcher({"focal": float("nan")})
    with pytest.raises(ValueError, match="all cost weights are zero"):
        HungarianMatcher({"focal": 0.0})


def test_giou_cost_known_values(codec):
    pred = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 11.0, 11.0]])}
    tgt = {"boxes": torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])}
    expected = -np.array([[1 / 7 - 2 / 9, 1.0], [-(100 - 5) / 100, -(121 - 5) / 121]])  # hulls 10x10 and 11x11
    np.testing.assert_allclose(COSTS.get("giou")(pred, tgt, codec).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_cost_terms_match_hand_computation(codec):
    outputs, targets = make_batch([4], k=6, codec=codec, seed=1)
    pred, tgt = image(outputs, 0), targets[0]
    logits, pboxes, pemb = pred["logits"].double().numpy(), pred["boxes"].double().numpy(), pred["mask_embeds"].double().numpy()
    tboxes, labels, temb = tgt["boxes"].double().numpy(), tgt["labels"].numpy(), tgt["mask_embeds"].double().numpy()
    grids = (tgt["mask_grids"].numpy() >= 0.5).astype(np.float64)
    decoded = codec.decode(pred["mask_embeds"]).double().numpy()
    h, w = 60.0, 80.0
    k, t = logits.shape[0], len(labels)
    want = {name: np.zeros((k, t)) for name in ("focal", "l1", "giou", "cosine", "embed_l1", "dice")}
    for i in range(k):
        for j in range(t):
            p = 1 / (1 + math.exp(-logits[i, labels[j]]))
            want["focal"][i, j] = (0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                                   - 0.75 * p ** 2 * -math.log(1 - p + 1e-8))
            want["l1"][i, j] = sum(abs(pboxes[i, c] - tboxes[j, c]) / (w if c % 2 == 0 else h) for c in range(4))
            want["giou"][i, j] = -hand_giou(pboxes[i], tboxes[j])
            cos = pemb[i] @ temb[j] / (np.linalg.norm(pemb[i]) * np.linalg.norm(temb[j]))
            want["cosine"][i, j] = -(cos + 1) / 2
            want["embed_l1"][i, j] = np.abs(pemb[i] - temb[j]).mean()
            pm, tm = decoded[i].ravel(), grids[j].ravel()
            want["dice"][i, j] = 1 - 2 * (pm * tm).sum() / ((pm ** 2).sum() + (tm ** 2).sum() + 1e-5)
    for name, expected in want.items():
        got = COSTS.get(name)(pred, tgt, codec)
        assert got.shape == (k, t) and got.dtype == torch.float32, name
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_mask_cost_terms_encode_when_target_embeds_absent(codec):
    outputs, targets = make_batch([3], k=4, codec=codec, seed=2)
    bare = {k: v for k, v in targets[0].items() if k != "mask_embeds"}
    for name in ("cosine", "embed_l1"):
        term = COSTS.get(name)
        torch.testing.assert_close(term(image(outputs, 0), bare, codec), term(image(outputs, 0), targets[0], codec))


@pytest.mark.parametrize("name", ["focal", "l1", "giou", "cosine", "embed_l1", "dice"])
def test_batched_form_equals_one_image_form(codec, name):
    from istr.matching.matcher import _PaddedTargets

    outputs, targets = make_batch([3, 1, 2], k=5, codec=codec, seed=3)
    targets[1]["image_size"] = torch.tensor([40.0, 100.0])  # per-image normalisation must follow each image
    term = COSTS.get(name)
    assert term.batched
    padded = term(outputs, _PaddedTargets(targets, 3), codec)
    assert padded.shape == (3, 5, 3)
    for b, t in enumerate(targets):
        torch.testing.assert_close(padded[b, :, : len(t["labels"])], term(image(outputs, b), t, codec))


# ----------------------------------------------------------------------------- matcher
def brute_force(cost: np.ndarray) -> tuple[float, tuple]:
    """Minimum total cost over all one-to-one assignments of min(K, T) pairs, and the argmin pairs."""
    k, t = cost.shape
    best = (math.inf, ())
    if t <= k:
        for rows in itertools.permutations(range(k), t):
            total = sum(cost[r, c] for c, r in enumerate(rows))
            best = min(best, (total, tuple(sorted(zip(rows, range(t))))))
    else:
        for cols in itertools.permutations(range(t), k):
            total = sum(cost[r, c] for r, c in enumerate(cols))
            best = min(best, (total, tuple(zip(range(k), cols))))
    return best


@pytest.mark.parametrize("sizes,k", [([0, 1, 3, 5], 5), ([2, 2, 2], 5), ([6, 4], 4), ([1], 6), ([0, 0], 3)])
def test_matcher_is_optimal_against_brute_force(codec, sizes, k):
    matcher = HungarianMatcher({**DEFAULT_COSTS, "dice": 1.0})
    for seed in range(3):
        outputs, targets = make_batch(sizes, k=k, codec=codec, seed=10 + seed)
        indices = matcher(outputs, targets, codec)
        assert len(indices) == len(sizes)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            assert pred_idx.dtype == tgt_idx.dtype == torch.int64
            n = min(k, sizes[b])
            assert len(pred_idx) == len(tgt_idx) == n
            if n == 0:
                continue
            assert torch.all(pred_idx[1:] > pred_idx[:-1])  # sorted, distinct
            assert len(set(tgt_idx.tolist())) == n
            cost = matcher.cost_matrix(image(outputs, b), targets[b], codec).double().numpy()
            best_total, best_pairs = brute_force(cost)
            ours = tuple(sorted(zip(pred_idx.tolist(), tgt_idx.tolist())))
            assert cost[pred_idx.numpy(), tgt_idx.numpy()].sum() == pytest.approx(best_total, rel=1e-6, abs=1e-6)
            assert ours == best_pairs  # random problems: the optimum is unique
            assert [tuple(x.tolist()) for x in matcher.match_one(image(outputs, b), targets[b], codec)] == \
                   [tuple(x.tolist()) for x in (pred_idx, tgt_idx)]


def test_grouped_batched_path_equals_per_image_path(codec):
    matcher = HungarianMatcher(DEFAULT_COSTS)
    sizes = [20, 1, 0, 5, 5, 2, 8]
    outputs, targets = make_batch(sizes, k=24, codec=codec, seed=4)
    groups = matcher._groups(sizes)
    assert sorted(itertools.chain(*groups)) == [b for b, t in enumerate(sizes) if t] and len(groups) > 1
    for group in groups:  # padding at most half of each group's matrix
        assert len(group) * max(sizes[b] for b in group) <= 2 * sum(sizes[b] for b in group)
    assert matcher._groups([4, 4, 4]) == [[0, 1, 2]]
    batched = matcher._cost_matrices(outputs, targets, sizes, codec, batched=True)
    single = matcher._cost_matrices(outputs, targets, sizes, codec, batched=False)
    for a, b in zip(batched, single):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_zero_target_images_get_empty_indices(codec):
    outputs, targets = make_batch([0, 3, 0], k=4, codec=codec)
    indices = HungarianMatcher()(outputs, targets, codec)
    for b in (0, 2):
        assert indices[b][0].shape == indices[b][1].shape == (0,)
        assert indices[b][0].dtype == torch.int64
    assert len(indices[1][0]) == 3


@pytest.mark.parametrize("key,value,terms", [("logits", float("nan"), ["focal"]),
                                             ("boxes", float("inf"), ["l1", "giou"]),
                                             ("mask_embeds", float("nan"), ["cosine"])])
def test_nonfinite_cost_raises_naming_term_and_image(codec, key, value, terms):
    outputs, targets = make_batch([2, 3, 2], k=4, codec=codec)
    outputs[key][1, 2, 0] = value
    with pytest.raises(ValueError, match="image 1") as info:
        HungarianMatcher()(outputs, targets, codec)
    for term in terms:
        assert repr(term) in str(info.value)
    if key == "logits":
        assert "'l1'" not in str(info.value)


def test_codec_refusal_in_dice_cost_names_term_and_image(codec):
    outputs, targets = make_batch([2, 3], k=4, codec=codec)
    outputs["mask_embeds"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cost term 'dice' failed on image 1"):
        HungarianMatcher({"focal": 1.0, "dice": 1.0})(outputs, targets, codec)


def test_matcher_input_checks(codec):
    outputs, targets = make_batch([2, 3], k=4, codec=codec)
    with pytest.raises(ValueError, match="list of 2 dicts"):
        HungarianMatcher()(outputs, targets[:1], codec)
    with pytest.raises(ValueError, match=r"outputs\['boxes'\] must be \[B, K, \.\.\.\]"):
        HungarianMatcher()({**outputs, "boxes": outputs["boxes"][0]}, targets, codec)


def test_costs_in_fp32_under_autocast_and_without_grad(codec):
    outputs, targets = make_batch([3, 2], k=6, codec=codec, seed=5)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    matcher = HungarianMatcher()
    plain = matcher(outputs, targets, codec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = matcher(outputs, targets, codec)
        cost = matcher.cost_matrix(image(outputs, 0), targets[0], codec)
    assert cost.dtype == torch.float32 and not cost.requires_grad
    for (a, b), (c, d) in zip(plain, under_autocast):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_mask_cost_variants_are_one_dict_change(codec):
    """Paper Table 1b: the mask cost is swapped by editing the costs dict only."""
    outputs, targets = make_batch([3, 2], k=6, codec=codec, seed=6)
    for mask_term in ("cosine", "embed_l1", "dice"):
        costs = {"focal": 2.0, "l1": 5.0, "giou": 2.0, mask_term: 2.0}
        indices = HungarianMatcher(costs)(outputs, targets, codec)
        assert [len(i) for i, _ in indices] == [3, 2]


def test_custom_unbatched_term_is_called_per_image(codec):
    calls = []

    @register_cost("test_only_count_calls")
    def count_calls(pred, tgt, codec):
        calls.append(pred["boxes"].shape)
        return torch.zeros(pred["boxes"].shape[0], len(tgt["labels"]))

    try:
        outputs, targets = make_batch([2, 0, 2], k=4, codec=codec)
        HungarianMatcher({"l1": 1.0, "test_only_count_calls": 1.0})(outputs, targets, codec)
        assert calls == [(4, 4), (4, 4)]
    finally:
        COSTS._entries.pop("test_only_count_calls")
