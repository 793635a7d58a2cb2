"""Denoising training (ISTR(denoising_groups=G)): extra training queries at jittered GT boxes, no matching."""
from __future__ import annotations

import pytest
import torch

import istr
from istr.losses import LOSSES, SetCriterion
from istr.matching import HungarianMatcher
from istr.models import ISTRStage
from model_utils import make_batch, tiny_model


def test_denoising_adds_loss_terms_and_trains_its_query():
    model = tiny_model(denoising_groups=2).train()
    images, targets = make_batch()
    losses = model(images, targets)
    dn = {k for k in losses if "_dn_s" in k}
    assert dn == {f"{t}_dn_s{s}" for t in ("focal", "l1", "giou", "embed_l2", "dice") for s in range(2)}
    terms = sum(v for k, v in losses.items() if k != "loss")
    assert torch.allclose(losses["loss"].detach(), terms, rtol=1e-6)
    losses["loss"].backward()
    assert model.denoising_query.grad is not None and model.denoising_query.grad.abs().sum() > 0
    # with no ground truth in the batch the denoising pass is skipped, not an error
    _, empty = make_batch(empty=True)
    assert not any("_dn_s" in k for k in model(images, empty))


def test_denoising_terms_are_the_set_loss_terms_at_the_fixed_assignment():
    """The criterion's denoising part = each registered term at the given (query, target) pairs, normalised
    by the number of denoising queries (G x boxes), weighted."""
    torch.manual_seed(0)
    codec = istr.create_codec("dct", mask_size=16, dim=12)
    crit = SetCriterion(HungarianMatcher(), num_classes=3)
    b, k, g = 2, 6, 2
    def outputs(n):
        return [{"logits": torch.randn(b, n, 3), "boxes": torch.tensor([10., 10, 40, 40]) + torch.rand(b, n, 4) * 5,
                 "mask_embeds": torch.randn(b, n, 12)}]
    targets = [{"boxes": torch.tensor([[8., 9, 41, 44], [20, 5, 60, 30]]), "labels": torch.tensor([0, 2]),
                "mask_grids": (torch.rand(2, 16, 16) > 0.5).float(), "image_size": torch.tensor([64., 64.])},
               {"boxes": torch.tensor([[1., 2, 30, 33]]), "labels": torch.tensor([1]),
                "mask_grids": (torch.rand(1, 16, 16) > 0.5).float(), "image_size": torch.tensor([64., 64.])}]
    # copy c of image 0 sits at queries [2c, 2c+2), image 1 (1 box, padded to 2) at 2c
    indices = [(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1])), (torch.tensor([0, 2]), torch.tensor([0, 0]))]
    dn_outputs = outputs(g * 2)
    got = crit(outputs(k), targets, codec, denoising=(dn_outputs, indices))
    with_embeds = [{**t, "mask_embeds": codec.encode(t["mask_grids"])} for t in targets]
    for name, weight in crit.losses.items():
        want = weight * LOSSES.get(name)(dn_outputs[0], with_embeds, indices, codec, 3.0 * g)
        assert torch.allclose(got[f"{name}_dn_s0"], want, rtol=1e-5), name


def test_stage_attention_mask_isolates_the_copies():
    """A block-diagonal mask makes each block's outputs those of the block run alone."""
    torch.manual_seed(0)
    stage = ISTRStage(3, 12, hidden_dim=32, dynamic_dim=8, ffn_dim=64, num_heads=4).eval()
    features = [torch.randn(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[4., 4, 30, 30], [10, 20, 60, 50], [0, 0, 64, 64], [5, 30, 25, 60]]])
    queries = torch.randn(1, 4, 32)
    block = torch.tensor([0, 0, 1, 1])
    together = stage(features, boxes, queries, attn_mask=block[:, None] != block[None])
    alone = stage(features, boxes[:, 2:], queries[:, 2:])
    for a, b in zip(together, alone):
        assert torch.allclose(a[:, 2:], b, atol=1e-5)
    unmasked = stage(features, boxes, queries)
    assert not torch.allclose(unmasked[1][:, 2:], alone[1], atol=1e-5)


def test_denoising_leaves_inference_unchanged_and_round_trips(tmp_path):
    images, _ = make_batch()
    dn = tiny_model(denoising_groups=3, denoising_box_noise=0.6).eval()
    plain = tiny_model().eval()
    state = {k: v for k, v in dn.state_dict().items() if k != "denoising_query"}
    plain.load_state_dict(state)
    with torch.no_grad():
        a, b = dn(images), plain(images)
    for ra, rb in zip(a, b):
        assert torch.equal(ra["boxes"], rb["boxes"]) and torch.equal(ra["scores"], rb["scores"])
    istr.save_model(dn, tmp_path / "dn.safetensors")
    loaded = istr.load_model(tmp_path / "dn.safetensors")
    assert loaded.denoising_groups == 3 and loaded.denoising_box_noise == 0.6
    with pytest.raises(ValueError, match="denoising_groups"):
        istr.load_model(tmp_path / "dn.safetensors", model=plain)


@pytest.mark.parametrize("kwargs, match", [({"denoising_groups": -1}, "denoising_groups"),
                                           ({"denoising_groups": 1.5}, "denoising_groups"),
                                           ({"denoising_groups": 1, "denoising_box_noise": 0.0}, "denoising_box_noise")])
def test_bad_denoising_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**kwargs)
