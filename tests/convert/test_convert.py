"""istr.convert: the authors' checkpoints (ISTR v1, Deformable DETR) -> istr models, driven by layout manifests.

Source checkpoints are generated from tests/data/manifests/*.json (key names and shapes read from the authors'
code, written by make_manifests.py). Their tensors are views into one random pool so the files stay small.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import istr
from istr.convert import COCO_CATEGORIES, COCO_CATEGORY_IDS, cli_main, convert, load_init

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"
POOL = 9_000_000  # > the largest tensor (the dynamic-parameter generator, 32768 x 256)


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


@functools.lru_cache(maxsize=2)
def pools(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(POOL, generator=g) * 0.02, torch.rand(POOL, generator=g) * 0.5 + 0.5


def pooled(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with these shapes, as views into two shared pools (plain and positive values): torch.save
    stores each pool once. Variances and box sizes come from the positive pool."""
    plain, positive = pools(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):  # an int64 scalar counter
            out[key] = torch.tensor(1000, dtype=torch.int64)
            continue
        n = int(np.prod(shape)) if shape else 1
        offset = zlib.crc32(key.encode()) % (POOL - n)
        pool = positive if key.endswith(("running_var", "explained_variances", "explained_variance",
                                         "init_proposal_boxes.weight", "query_boxes")) else plain
        out[key] = pool[offset:offset + n].view(shape)
    return out


def lite(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Zero tensors of these shapes backed by one number each (expanded views): tiny files for layout errors."""
    return {k: torch.zeros(1).expand(*v) if v else torch.zeros(()) for k, v in shapes.items()}


def istr_v1_checkpoint(path: Path, depth: int = 50, seed: int = 0, edit=None,
                       values: bool = True) -> dict[str, torch.Tensor]:
    m = manifest("istr_v1_r50")
    shapes = dict(m["keys"])
    if depth == 101:  # R101: res4 has 23 blocks, blocks 1.. all shaped like block 1
        block1 = {k: v for k, v in shapes.items() if k.startswith("backbone.bottom_up.res4.1.")}
        for b in range(6, m["r101_res4_blocks"]):
            shapes.update({k.replace("res4.1.", f"res4.{b}."): v for k, v in block1.items()})
    sd = pooled(shapes, seed) if values else lite(shapes)
    if edit:
        edit(sd)
    torch.save({"model": sd, "iteration": 269999}, path)
    return sd


def shared(m: dict, sd: dict[str, torch.Tensor]) -> None:
    """Make the manifest's shared groups (one module listed once per decoder layer) identical tensors."""
    for group in m["shared_groups"]:  # one module listed 6 times: identical tensors
        first = {k: v for k, v in sd.items() if k.startswith(group.format(i=0))}
        for i in range(1, 6):
            sd.update({k.replace(group.format(i=0), group.format(i=i)): v for k, v in first.items()})


def dd_checkpoint(path: Path, seed: int = 0, edit=None, args: dict | None = None,
                  values: bool = True) -> dict[str, torch.Tensor]:
    m = manifest("deformable_detr_r50")
    sd = pooled(m["keys"], seed) if values else lite(m["keys"])
    shared(m, sd)
    if edit:
        edit(sd)
    ns = argparse.Namespace(**{"num_feature_levels": 4, "two_stage": False, "with_box_refine": False,
                               "dilation": False, "masks": False, "backbone": "resnet50", "num_queries": 300,
                               "hidden_dim": 256, **(args or {})})
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"last_epoch": 50},
                "epoch": 49, "args": ns}, path)
    return sd


def small(model):
    """64-pixel inputs for CPU tests (eval and train resize)."""
    model.transform.min_size = model.transform.max_size = 64
    model.transform.train_min_sizes = (64,)
    return model


def image(seed: int = 0, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def targets(num_classes: int) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:30] = 1
    masks[1, 30:60, 20:60] = 1
    return [{"boxes": torch.tensor([[10.0, 8, 30, 40], [20, 30, 60, 60]]), "labels": torch.tensor([1, num_classes - 1]),
             "masks": masks}]


def same(state: dict[str, torch.Tensor], src: dict[str, torch.Tensor], pairs: dict[str, str]) -> None:
    """Each converted tensor equals its source tensor exactly ({target key: source key})."""
    for target, source in pairs.items():
        assert torch.equal(state[target], src[source]), (target, source)


def forward_both(model) -> None:
    small(model).eval()
    with torch.no_grad():
        out = model([image()])
    assert len(out) == 1 and torch.isfinite(out[0]["scores"]).all() and out[0]["masks"].shape[-2:] == (64, 64)
    model.train()
    torch.manual_seed(0)
    losses = model([image()], targets(model.num_classes))
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """An ISTR v1 R50 checkpoint from the manifest, converted once: (dir, src, ckpt, model, report, file)."""
    d = tmp_path_factory.mktemp("v1")
    src = istr_v1_checkpoint(d / "istr_r50.pth")
    model, report = convert(d / "istr_r50.pth", "istr-v1", out=d / "m.safetensors")
    yield SimpleNamespace(dir=d, src=src, ckpt=d / "istr_r50.pth", model=model, report=report,
                          file=d / "m.safetensors")
    shutil.rmtree(d, ignore_errors=True)  # ~480 MB: not kept to the end of the session


@pytest.fixture(scope="module")
def dd(tmp_path_factory):
    """A Deformable DETR checkpoint from the manifest, converted once: (dir, src, ckpt, model, report, file)."""
    d = tmp_path_factory.mktemp("dd")
    src = dd_checkpoint(d / "dd.pth")
    model, report = convert(d / "dd.pth", "deformable-detr", out=d / "isda.safetensors")
    yield SimpleNamespace(dir=d, src=src, ckpt=d / "dd.pth", model=model, report=report, file=d / "isda.safetensors")
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- manifests
def test_istr_v1_manifest_converts_loads_and_runs(v1):
    src, model, report = v1.src, v1.model, v1.report
    assert report.target == "istr_r50_fpn_pca60"
    assert set(report.mapped) == set(src) and set(report.dropped) == {"<iteration>"}
    assert report.fresh == {} and set(report.filled) == set(model.state_dict())
    loaded = istr.load_model(v1.file)
    assert loaded.categories == COCO_CATEGORIES and loaded.config()["image_pool_padding"] is True
    state = loaded.state_dict()
    # a few mappings spelled out against the source
    same(state, src, {"backbone.body.layer3.5.bn2.running_var": "backbone.bottom_up.res4.5.conv2.norm.running_var",
                      "backbone.body.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
                      "backbone.neck.inner_blocks.0.0.weight": "backbone.fpn_lateral2.weight",
                      "backbone.neck.layer_blocks.3.0.bias": "backbone.fpn_output5.bias",
                      "stages.4.interaction.generator.weight": "head.head_series.4.inst_interact.dynamic_layer.weight",
                      "stages.2.class_branch.9.bias": "head.head_series.2.class_logits.bias",
                      "stages.5.mask_branch.7.weight": "head.head_series.5.mask_module.7.weight",
                      "query_boxes": "init_proposal_boxes.weight",
                      "codec.explained_variance": "mask_encoding.explained_variances"})
    assert loaded.codec.is_fitted
    forward_both(loaded)


def test_istr_v1_r101_depth_from_keys(tmp_path):
    """R101 = 23 res4 blocks: detected from the keys (building the R101 model is left to the presets' tests)."""
    from istr.convert.istr_v1 import detect_istr_v1

    src = istr_v1_checkpoint(tmp_path / "r101.pth", depth=101, values=False)
    assert detect_istr_v1(list(src), {k: tuple(v.shape) for k, v in src.items()}, "r101.pth") == 101
    with pytest.raises(ValueError, match="ResNet-101.*istr_r101_fpn_pca60"):
        convert(tmp_path / "r101.pth", "istr-v1", model_name="istr_r50_fpn_pca60")
    del src["backbone.bottom_up.res4.22.conv1.weight"]  # 22 blocks: neither depth
    torch.save({"model": {k: v for k, v in src.items() if not k.startswith("backbone.bottom_up.res4.22.")}},
               tmp_path / "r22.pth")
    with pytest.raises(ValueError, match="22 blocks in res4"):
        convert(tmp_path / "r22.pth", "istr-v1")


def test_deformable_detr_manifest_converts_loads_and_runs(dd):
    src, model, report = dd.src, dd.model, dd.report
    assert set(report.mapped) | {k for k in report.dropped if not k.startswith("<")} == set(src)
    assert {k for k in report.dropped if k.startswith("<")} == {"<optimizer>", "<lr_scheduler>", "<epoch>", "<args>",
                                                                  "<class_embed rows>"}
    assert all(k.startswith("bbox_embed.") for k in report.dropped if not k.startswith("<"))
    fresh_prefixes = ("backbone.neck.lateral.0.", "mask_features.", "kernel_head.")
    assert set(report.fresh) == {k for k in model.state_dict() if k.startswith(fresh_prefixes)}
    assert set(report.filled) | set(report.fresh) == set(model.state_dict())
    loaded = istr.load_model(dd.file)
    state = loaded.state_dict()
    ids = torch.tensor(COCO_CATEGORY_IDS)
    assert torch.equal(state["class_embed.weight"], src["class_embed.0.weight"][ids])
    assert torch.equal(state["class_embed.bias"][0], src["class_embed.3.bias"][1])  # person: COCO id 1
    same(state, src, {"backbone.neck.lateral.1.0.weight": "input_proj.0.0.weight",
                      "backbone.neck.lateral.1.0.bias": "input_proj.0.0.bias",
                      "backbone.neck.extra.0.1.bias": "input_proj.3.1.bias",
                      "transformer.decoder.3.norm1.weight": "transformer.decoder.layers.3.norm2.weight",
                      "transformer.decoder.3.norm2.weight": "transformer.decoder.layers.3.norm1.weight",
                      "transformer.encoder.5.ffn.3.weight": "transformer.encoder.layers.5.linear2.weight",
                      "transformer.query_embedding.weight": "query_embed.weight",
                      "backbone.body.layer4.2.bn3.running_mean": "backbone.0.body.layer4.2.bn3.running_mean"})
    assert loaded.categories == COCO_CATEGORIES
    forward_both(loaded)


def test_deformable_detr_mmdetection_layout(tmp_path):
    """ISDA's config loads mmdetection's Deformable DETR file: its layout converts to the same isda_r50 parts."""
    m = manifest("deformable_detr_r50_mmdet")
    src = pooled(m["keys"], seed=2)
    shared(m, src)
    names = tuple(c["name"] for c in COCO_CATEGORIES)
    torch.save({"meta": {"mmdet_version": "2.12.0", "CLASSES": names}, "state_dict": src}, tmp_path / "mm.pth")
    model, report = convert(tmp_path / "mm.pth", "deformable-detr")
    assert "layout: mmdetection" in report.notes
    assert set(report.mapped) | {k for k in report.dropped if not k.startswith("<")} == set(src)
    assert all(k.startswith("bbox_head.reg_branches.") or k.endswith("num_batches_tracked")
               for k in report.dropped if not k.startswith("<"))
    fresh_prefixes = ("backbone.neck.lateral.0.", "mask_features.", "kernel_head.")
    assert set(report.fresh) == {k for k in model.state_dict() if k.startswith(fresh_prefixes)}
    assert set(report.filled) | set(report.fresh) == set(model.state_dict())
    state = model.state_dict()
    t = "bbox_head.transformer."
    assert torch.equal(state["class_embed.weight"], src["bbox_head.cls_branches.0.weight"])
    assert torch.equal(state["backbone.neck.lateral.2.0.weight"], src["neck.convs.1.conv.weight"])
    # mmdet's ConvModule has no conv bias: isda_r50's neck has none either (or, in a model with one, it is zero)
    assert torch.equal(state.get("backbone.neck.lateral.2.0.bias", torch.zeros(256)), torch.zeros(256))
    assert torch.equal(state["backbone.neck.extra.0.1.weight"], src["neck.extra_convs.0.gn.weight"])
    assert torch.equal(state["transformer.level_embed"], src[t + "level_embeds"])
    assert torch.equal(state["transformer.decoder.2.self_attn.in_proj_weight"],
                       src[t + "decoder.layers.2.attentions.0.attn.in_proj_weight"])
    assert torch.equal(state["transformer.decoder.2.cross_attn.sampling_offsets.bias"],
                       src[t + "decoder.layers.2.attentions.1.sampling_offsets.bias"])
    assert torch.equal(state["transformer.decoder.4.norm1.weight"], src[t + "decoder.layers.4.norms.0.weight"])
    assert torch.equal(state["transformer.encoder.1.norm2.bias"], src[t + "encoder.layers.1.norms.1.bias"])
    assert torch.equal(state["transformer.encoder.3.ffn.3.weight"], src[t + "encoder.layers.3.ffns.0.layers.1.weight"])
    assert torch.equal(state["backbone.body.layer2.0.downsample.1.running_var"],
                       src["backbone.layer2.0.downsample.1.running_var"])
    small(model).eval()
    with torch.no_grad():
        assert torch.isfinite(model([image()])[0]["scores"]).all()
    torch.save({"meta": {"CLASSES": ("cat", "dog")}, "state_dict": src}, tmp_path / "mm2.pth")
    with pytest.raises(ValueError, match="2 classes"):
        convert(tmp_path / "mm2.pth", "deformable-detr")


# ---------------------------------------------------------------------------------------------------- v1 reference
def d2_backbone(src: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """detectron2's ResNet (STRIDE_IN_1X1=False, FrozenBN) + FPN, written from the source keys: P2..P5."""
    def conv_bn(name, x, stride=1, padding=0, relu=True):
        w = src[f"backbone.bottom_up.{name}.weight"]
        n = {k: src[f"backbone.bottom_up.{name}.norm.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        scale = n["weight"] * (n["running_var"] + 1e-5).rsqrt()
        y = F.conv2d(x, w, stride=stride, padding=padding) * scale[:, None, None] + \
            (n["bias"] - n["running_mean"] * scale)[:, None, None]
        return F.relu(y) if relu else y

    x = F.max_pool2d(conv_bn("stem.conv1", x, 2, 3), 3, 2, 1)
    feats = []
    for s, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            stride = 2 if (b == 0 and s > 2) else 1
            y = conv_bn(f"res{s}.{b}.conv1", x)
            y = conv_bn(f"res{s}.{b}.conv2", y, stride, 1)
            y = conv_bn(f"res{s}.{b}.conv3", y, relu=False)
            short = conv_bn(f"res{s}.{b}.shortcut", x, stride, relu=False) if b == 0 else x
            x = F.relu(y + short)
        feats.append(x)
    lat = [F.conv2d(f, src[f"backbone.fpn_lateral{k}.weight"], src[f"backbone.fpn_lateral{k}.bias"])
           for k, f in zip(range(2, 6), feats)]
    prev, outs = lat[3], {}
    for k in (5, 4, 3, 2):
        if k < 5:
            prev = lat[k - 2] + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        outs[k] = F.conv2d(prev, src[f"backbone.fpn_output{k}.weight"], src[f"backbone.fpn_output{k}.bias"], padding=1)
    return [outs[k] for k in (2, 3, 4, 5)]


def v1_stage(src: dict[str, torch.Tensor], i: int, feats: list[torch.Tensor], boxes: torch.Tensor,
             queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage of the authors' v1 head (RCNNHead + DynamicConv) from the source keys, on one image:
    boxes [K, 4] xyxy, queries [K, d] -> (queries, class logits, new boxes, mask embeddings)."""
    from torchvision.ops import roi_align

    def p(name):
        return src[f"head.head_series.{i}.{name}"]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p(f"{name}.weight"), p(f"{name}.bias"))

    k, d = queries.shape
    # ROIPooler "ROIAlignV2": level floor(4 + log2(sqrt(area) / 224)), clamped to P2..P5; aligned, sampling 2
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(4 + torch.log2(area.sqrt() / 224 + 1e-8)).clamp(2, 5).long()
    rois = torch.stack([roi_align(feats[int(lv) - 2], [box[None]], 7, 1.0 / 2 ** int(lv), 2, aligned=True)[0]
                        for box, lv in zip(boxes, level)])  # [K, d, 7, 7]
    q = queries[:, None]  # [K, 1, d]: (sequence, batch, channels) as nn.MultiheadAttention's default
    attn, _ = F.multi_head_attention_forward(q, q, q, d, 8, p("self_attn.in_proj_weight"), p("self_attn.in_proj_bias"),
                                             None, None, False, 0.0, p("self_attn.out_proj.weight"),
                                             p("self_attn.out_proj.bias"), training=False, need_weights=False)
    q = ln((q + attn)[:, 0], "norm1")
    params = F.linear(q, p("inst_interact.dynamic_layer.weight"), p("inst_interact.dynamic_layer.bias"))
    w1, w2 = params[:, : d * 64].view(k, d, 64), params[:, d * 64:].view(k, 64, d)
    x = rois.flatten(2).transpose(1, 2)  # [K, 49, d]
    x = F.elu(ln(torch.bmm(x, w1), "inst_interact.norm1"))
    x = F.elu(ln(torch.bmm(x, w2), "inst_interact.norm2"))
    x = F.elu(ln(F.linear(x.flatten(1), p("inst_interact.out_layer.weight"), p("inst_interact.out_layer.bias")),
                 "inst_interact.norm3"))
    q = ln(q + x, "norm2")
    ffn = F.linear(F.elu(F.linear(q, p("linear1.weight"), p("linear1.bias"))), p("linear2.weight"), p("linear2.bias"))
    q = ln(q + ffn, "norm3")

    def branch(module, last):
        h = q
        for j in (0, 3, 6):
            h = F.elu(ln(F.linear(h, p(f"{module}.{j}.weight")), f"{module}.{j + 1}"))
        return F.linear(h, p(f"{last}.weight"), p(f"{last}.bias"))

    logits, deltas, embeds = branch("cls_module", "class_logits"), branch("reg_module", "bboxes_delta"), \
        branch("mask_module", "mask_logits")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dw, dh = deltas[:, 2].clamp(max=math.log(1e5 / 16)), deltas[:, 3].clamp(max=math.log(1e5 / 16))
    pcx, pcy, pw, ph = cx + deltas[:, 0] / 2 * w, cy + deltas[:, 1] / 2 * h, w * dw.exp(), h * dh.exp()
    new = torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)
    return q, logits, new, embeds


def test_v1_converted_matches_the_authors_computation(v1):
    """The converted backbone, FPN and a head stage compute what the authors' v1 modules compute from the source
    weights (written here from their structure, independently of the converter's key map)."""
    from istr.convert.istr_v1 import convert_istr_v1_state

    # He-scaled convs, BN scales |N(0, 0.5)| and FPN biases N(0, 1), so the 50 layers carry the input's signal
    # and every tensor shows in the output (at the pool's 0.02 scale each block's output would be its BN bias: a
    # swapped BN went unnoticed); converted into a copy of the fixture's model
    def scaled(k: str, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 4:
            return v * math.sqrt(2 / v[0].numel()) / 0.02
        if k.startswith("backbone.bottom_up.") and k.endswith("norm.weight"):
            return v.abs() / 0.04
        return v / 0.02 if k.startswith("backbone.fpn_") and k.endswith("bias") else v

    src = {k: scaled(k, v) for k, v in v1.src.items()}
    model = copy.deepcopy(v1.model)
    model.load_state_dict(convert_istr_v1_state(src, model.state_dict())[0])
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))  # a normalised, padded input
    with torch.no_grad():
        ref, ours = d2_backbone(src, x), model.backbone(x)
        for r, o in zip(ref, ours):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
        g = torch.Generator().manual_seed(8)
        xy = torch.rand(12, 2, generator=g) * torch.tensor([60.0, 40.0])
        boxes = torch.cat([xy, xy + 8 + torch.rand(12, 2, generator=g) * 40], 1)  # [K, 4] xyxy, levels P2..P3
        queries = torch.randn(12, 256, generator=g)
        for i in (0, 5):
            rq, rl, rb, re_ = v1_stage(src, i, ref, boxes, queries)
            stage = model.stages[i]
            oq, ol, ob = stage(ours, boxes[None], queries[None])
            oe = stage.mask_embeds(oq, ob, ours)
            for o, r in ((oq[0], rq), (ol[0], rl), (ob[0], rb), (oe[0], re_)):
                torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- DD reference
def dd_msda(src: dict[str, torch.Tensor], prefix: str, query: torch.Tensor, ref: torch.Tensor, value_in: torch.Tensor,
            shapes: list[tuple[int, int]]) -> torch.Tensor:
    """Deformable DETR's MSDeformAttn from the source keys (8 heads, 4 levels, 4 points; the PyTorch reference
    path: bilinear grid_sample, zero padding, align_corners=False): query [Q, C], ref [Q, L, 2] (x, y) in [0, 1],
    value_in [S, C] -> [Q, C]."""
    def lin(x, name):
        return F.linear(x, src[f"{prefix}.{name}.weight"], src[f"{prefix}.{name}.bias"])

    q, c = query.shape
    m, lv, pts, d = 8, 4, 4, c // 8
    value = lin(value_in, "value_proj").view(-1, m, d)
    offsets = lin(query, "sampling_offsets").view(q, m, lv, pts, 2)
    weights = lin(query, "attention_weights").view(q, m, lv * pts).softmax(-1).view(q, m, lv, pts)
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)  # (x, y) order
    loc = ref[:, None, :, None, :] + offsets / normalizer[None, None, :, None, :]
    out, start = torch.zeros(q, m, d), 0
    for level, (h, w) in enumerate(shapes):
        v = value[start:start + h * w].view(h, w, m, d).permute(2, 3, 0, 1)  # [M, D, h, w]
        grid = (2 * loc[:, :, level] - 1).transpose(0, 1)  # [M, Q, P, 2]
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [M, D, Q, P]
        out += (sampled * weights[:, :, level].transpose(0, 1)[:, None]).sum(-1).permute(2, 0, 1)
        start += h * w
    return lin(out.reshape(q, c), "output_proj")


def test_deformable_detr_converted_matches_the_authors_computation(dd):
    """The converted neck levels, an encoder layer and a decoder layer compute what Deformable DETR's modules
    compute from the source weights (written here from their structure, independently of the key map)."""
    src, model = dd.src, dd.model.eval()
    g = torch.Generator().manual_seed(9)

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], src[f"{name}.weight"], src[f"{name}.bias"])

    def ffn(x, p):
        return F.linear(F.relu(F.linear(x, src[f"{p}.linear1.weight"], src[f"{p}.linear1.bias"])),
                        src[f"{p}.linear2.weight"], src[f"{p}.linear2.bias"])

    with torch.no_grad():
        # input_proj: 1x1 conv + GN(32) on C3..C5, 3x3 s2 conv + GN on C5
        feats = [torch.randn(1, c, 32 // s, 32 // s, generator=g)
                 for c, s in ((256, 1), (512, 2), (1024, 4), (2048, 8))]
        levels = model.backbone.neck(feats)
        for i, (f, stride, pad) in enumerate(((feats[1], 1, 0), (feats[2], 1, 0), (feats[3], 1, 0), (feats[3], 2, 1))):
            conv = F.conv2d(f, src[f"input_proj.{i}.0.weight"], src[f"input_proj.{i}.0.bias"], stride, pad)
            ref = F.group_norm(conv, 32, src[f"input_proj.{i}.1.weight"], src[f"input_proj.{i}.1.bias"])
            torch.testing.assert_close(levels[i + 1], ref, rtol=1e-4, atol=1e-5)
        shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
        s, q = sum(h * w for h, w in shapes), 10
        tokens, pos = torch.randn(s, 256, generator=g), torch.randn(s, 256, generator=g)
        ref_enc = torch.rand(s, 4, 2, generator=g)
        p = "transformer.encoder.layers.2"
        x = ln(tokens + dd_msda(src, f"{p}.self_attn", tokens + pos, ref_enc, tokens, shapes), f"{p}.norm1")
        x = ln(x + ffn(x, p), f"{p}.norm2")
        ours = model.transformer.encoder[2](tokens[None], pos[None], ref_enc[None], shapes)[0]
        torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
        tgt, qpos = torch.randn(q, 256, generator=g), torch.randn(q, 256, generator=g)
        ref_dec = torch.rand(q, 4, 2, generator=g)
        p = "transformer.decoder.layers.4"
        qk = (tgt + qpos)[:, None]  # (sequence, batch, channels)
        mha = {k: src[f"{p}.self_attn.{k}"] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                       "out_proj.bias")}
        attn, _ = F.multi_head_attention_forward(qk, qk, tgt[:, None], 256, 8, mha["in_proj_weight"],
                                                 mha["in_proj_bias"], None, None, False, 0.0, mha["out_proj.weight"],
                                                 mha["out_proj.bias"], training=False, need_weights=False)
        y = ln(tgt + attn[:, 0], f"{p}.norm2")  # Deformable DETR: norm2 follows the self-attention
        y = ln(y + dd_msda(src, f"{p}.cross_attn", y + qpos, ref_dec, x, shapes), f"{p}.norm1")
        y = ln(y + ffn(y, p), f"{p}.norm3")
        ours = model.transformer.decoder[4](tgt[None], qpos[None], ref_dec[None], x[None], shapes)[0]
        torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-4)
        ref_points = torch.sigmoid(F.linear(src["query_embed.weight"][:, :256],
                                            src["transformer.reference_points.weight"],
                                            src["transformer.reference_points.bias"]))
        query_pos = model.transformer.query_embedding.weight[:, :256]
        torch.testing.assert_close(model.transformer.reference_points(query_pos).sigmoid(), ref_points)


# ---------------------------------------------------------------------------------------------------- round trips
def to_istr_v1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Test-only inverse: this library's ISTR state dict -> the authors' v1 detectron2 names."""
    out = {}
    branch = {"class_branch": ("cls_module", "class_logits"), "box_branch": ("reg_module", "bboxes_delta"),
              "mask_branch": ("mask_module", "mask_logits")}
    inter = {"generator": "dynamic_layer", "out": "out_layer"}
    for k, v in state.items():
        if k == "codec.fitted":
            continue
        if m := re.fullmatch(r"backbone\.body\.conv1\.weight", k):
            new = "backbone.bottom_up.stem.conv1.weight"
        elif m := re.fullmatch(r"backbone\.body\.bn1\.(\w+)", k):
            new = f"backbone.bottom_up.stem.conv1.norm.{m[1]}"
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight", k):
            new = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)", k):
            new = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight", k):
            new = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight"
        elif m := re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)", k):
            new = f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"
        elif m := re.fullmatch(r"backbone\.neck\.(inner|layer)_blocks\.(\d)\.0\.(\w+)", k):
            new = f"backbone.fpn_{'lateral' if m[1] == 'inner' else 'output'}{int(m[2]) + 2}.{m[3]}"
        elif k == "position_embeddings":
            new = "pos_embeddings.weight"
        elif k == "query_boxes":
            new = "init_proposal_boxes.weight"
        elif k.startswith("codec."):
            new = {"codec.components": "mask_encoding.components", "codec.mean": "mask_encoding.means",
                   "codec.explained_variance": "mask_encoding.explained_variances"}[k]
        elif m := re.fullmatch(r"stages\.(\d+)\.(\w+)\.(\d+)\.(\w+)", k):
            mod, last = branch.get(m[2], (None, None))
            if m[2] == "ffn":
                new = f"head.head_series.{m[1]}.linear{1 if m[3] == '0' else 2}.{m[4]}"
            else:
                name = f"{mod}.{m[3]}" if int(m[3]) < 9 else last
                new = f"head.head_series.{m[1]}.{name}.{m[4]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.interaction\.(\w+)\.(\w+)", k):
            new = f"head.head_series.{m[1]}.inst_interact.{inter.get(m[2], m[2])}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.(.+)", k):
            new = f"head.head_series.{m[1]}.{m[2]}"
        else:
            raise AssertionError(f"no v1 name for {k}")
        out[new] = v
    return out


def to_deformable_detr(state: dict[str, torch.Tensor], extra_seed: int = 1) -> dict[str, torch.Tensor]:
    """Test-only inverse: ISDA -> official Deformable DETR names (91-row class head at the COCO ids, a random
    box head; ISDA's own modules left out)."""
    out = {}
    g = torch.Generator().manual_seed(extra_seed)
    for k, v in state.items():
        if k.startswith(("backbone.neck.lateral.0.", "mask_features.", "kernel_head.", "class_embed.")):
            continue
        if k.startswith("backbone.body."):
            new = "backbone.0.body." + k[len("backbone.body."):]
        elif m := re.fullmatch(r"backbone\.neck\.lateral\.(\d)\.(.+)", k):
            new = f"input_proj.{int(m[1]) - 1}.{m[2]}"
        elif m := re.fullmatch(r"backbone\.neck\.extra\.0\.(.+)", k):
            new = f"input_proj.3.{m[1]}"
        elif k == "transformer.query_embedding.weight":
            new = "query_embed.weight"
        elif m := re.fullmatch(r"transformer\.(encoder|decoder)\.(\d+)\.(.+)", k):
            rest = m[3].replace("ffn.0.", "linear1.").replace("ffn.3.", "linear2.")
            if m[1] == "decoder":
                rest = {"norm1": "norm2", "norm2": "norm1"}.get(rest.split(".")[0], rest.split(".")[0]) + \
                       rest[len(rest.split(".")[0]):]
            new = f"transformer.{m[1]}.layers.{m[2]}.{rest}"
        else:
            new = k
        out[new] = v
    w, b = torch.randn(91, 256, generator=g), torch.randn(91, generator=g)
    w[COCO_CATEGORY_IDS], b[COCO_CATEGORY_IDS] = state["class_embed.weight"], state["class_embed.bias"]
    box = [torch.randn(256, 256, generator=g), torch.randn(256, generator=g), torch.randn(256, 256, generator=g),
           torch.randn(256, generator=g), torch.randn(4, 256, generator=g), torch.randn(4, generator=g)]
    for i in range(6):  # one module, listed once per decoder layer
        out[f"class_embed.{i}.weight"], out[f"class_embed.{i}.bias"] = w, b
        for j in range(3):
            out[f"bbox_embed.{i}.layers.{j}.weight"] = box[2 * j]
            out[f"bbox_embed.{i}.layers.{j}.bias"] = box[2 * j + 1]
    return out


def test_round_trip_istr_v1_bit_identical(tmp_path):
    codec = istr.create_codec("pca", mask_size=28, dim=60, whiten=True, logit_space=True)
    # fewer queries and stages than the release (the converter reads both from the weights): a cheaper forward
    a = istr.create_model("istr_r50_fpn_pca60", codec=codec, image_pool_padding=True, num_queries=40, num_stages=3)
    values = pooled({k: list(v.shape) for k, v in a.state_dict().items() if k != "codec.fitted"}, seed=3)
    a.load_state_dict({**values, "codec.fitted": torch.tensor(True)})
    torch.save({"model": to_istr_v1(values), "iteration": 0}, tmp_path / "v1.pth")
    b, report = convert(tmp_path / "v1.pth", "istr-v1")
    assert b.config() == {**a.config(), "preset": b.config()["preset"]}
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    a, b = small(a).eval(), small(b).eval()
    with torch.no_grad():
        oa, ob = a([image(5)]), b([image(5)])
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(oa[0][key], ob[0][key]), key


def test_round_trip_deformable_detr_bit_identical(tmp_path):
    a = istr.create_model("isda_r50", neck_options={"bias": True, "first_kaiming": True})  # DD's input_proj has biases
    values = pooled({k: list(v.shape) for k, v in a.state_dict().items()}, seed=4)
    a.load_state_dict(values)
    torch.save({"model": to_deformable_detr(values), "epoch": 1}, tmp_path / "dd.pth")
    b, report = convert(tmp_path / "dd.pth", "deformable-detr")
    assert b.config() == a.config()
    sa, sb = a.state_dict(), b.state_dict()
    for k in report.fresh:  # ISDA's own modules (not in the source): taken from the model that was exported
        sb[k] = sa[k]
    b.load_state_dict(sb)
    assert all(torch.equal(sa[k], b.state_dict()[k]) for k in sa)
    a, b = small(a).eval(), small(b).eval()
    with torch.no_grad():
        oa, ob = a([image(6)]), b([image(6)])
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(oa[0][key], ob[0][key]), key


# ---------------------------------------------------------------------------------------------------- pixels
def hand_image() -> np.ndarray:
    """A 32 x 48 RGB uint8 image with distinct values per channel (HWC, as a decoded file)."""
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([(7 * x + 3 * y) % 256, (5 * y + 11) % 256, (x * y) % 256], -1).astype(np.uint8)


def normalised(model, rgb_uint8: np.ndarray) -> torch.Tensor:
    """The model's own normalised input for an image it does not resize."""
    model.transform.min_size, model.transform.max_size = min(rgb_uint8.shape[:2]), max(rgb_uint8.shape[:2])
    img = torch.from_numpy(rgb_uint8).permute(2, 0, 1).float() / 255
    batch, sizes = model.transform.eval()([img])
    assert sizes == [rgb_uint8.shape[:2]]
    return batch[0, :, : sizes[0][0], : sizes[0][1]]  # without the padding to a multiple of 32


def test_preprocessing_matches_detectron2_rgb(v1):
    """Authors' config: RGB 0..255, (x - PIXEL_MEAN) / PIXEL_STD; the converted model normalises to the same tensor."""
    model, report = v1.model, v1.report
    rgb = hand_image()
    d2 = (rgb.astype(np.float64) - np.array([123.675, 116.280, 103.530])) / np.array([58.395, 57.120, 57.375])
    ours = normalised(model, rgb)
    np.testing.assert_allclose(ours.permute(1, 2, 0).double().numpy(), d2, rtol=0, atol=2e-5)
    assert "RGB" in report.conventions[0]


def test_preprocessing_bgr_caffe_style_flips_first_conv(v1):
    """A BGR caffe-style detectron2 checkpoint (mean (103.53, 116.28, 123.675), std 1): the converted model,
    fed RGB [0, 1], gives the source's normalised tensor (channels reversed) and the same first-conv output."""
    src = v1.src
    mean_bgr = (103.530, 116.280, 123.675)
    model, report = convert(v1.ckpt, "istr-v1", input_format="BGR", pixel_mean=mean_bgr,
                            pixel_std=(1.0, 1.0, 1.0))
    rgb = hand_image()
    bgr = rgb[..., ::-1].astype(np.float64)
    d2 = torch.from_numpy((bgr - np.array(mean_bgr)).copy()).permute(2, 0, 1).float()  # detectron2's input, BGR
    ours = normalised(model, rgb)  # RGB order
    torch.testing.assert_close(ours, d2.flip(0), rtol=0, atol=1e-4)
    w_src = src["backbone.bottom_up.stem.conv1.weight"]
    out_src = F.conv2d(d2[None], w_src, stride=2, padding=3)
    out_ours = model.backbone.body.conv1(ours[None])
    torch.testing.assert_close(out_ours, out_src, rtol=1e-5, atol=1e-4)
    assert torch.equal(model.backbone.body.conv1.weight, w_src.flip(1))
    assert "flipped BGR -> RGB" in report.conventions[0]


# ---------------------------------------------------------------------------------------------------- bad input
def truncated(path: Path, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def test_bad_inputs_fail_clearly_and_write_nothing(v1, dd, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert(tmp_path / "missing.pth", "istr-v1", out=out)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert(truncated(v1.ckpt, tmp_path / "half.pth"), "istr-v1", out=out)
    with pytest.raises(ValueError, match="Deformable DETR checkpoint.*deformable-detr"):
        convert(dd.ckpt, "istr-v1", out=out)
    with pytest.raises(ValueError, match="detectron2 checkpoint.*istr-v1"):
        convert(v1.ckpt, "deformable-detr", out=out)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "plain.pth")  # a bare torchvision state dict
    with pytest.raises(ValueError, match="no 'model' or 'state_dict' entry"):
        convert(tmp_path / "plain.pth", "deformable-detr", out=out)
    torch.save({"meta": {"mmdet_version": "2.17"}, "state_dict": {"backbone.conv1.weight": torch.zeros(1),
                                                                   "roi_head.bbox_head.fc_cls.weight": torch.zeros(1)}},
               tmp_path / "mmdet_rcnn.pth")
    with pytest.raises(ValueError, match="mmdetection checkpoint of another model"):
        convert(tmp_path / "mmdet_rcnn.pth", "deformable-detr", out=out)
    with pytest.raises(ValueError, match="mmdetection checkpoint"):
        convert(tmp_path / "mmdet_rcnn.pth", "istr-v1", out=out)
    with pytest.raises(ValueError, match="source must be one of"):
        convert(v1.ckpt, "detr", out=out)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_source_state_dict_entries():
    from istr.convert.common import source_state_dict

    w = torch.zeros(2)
    assert source_state_dict({"model": {"module.a.weight": w}}, "f", "x")[0].keys() == {"a.weight"}  # DDP prefix
    tensors, others = source_state_dict({"meta": {}, "state_dict": {"a": w}}, "f", "x", entries=("model", "state_dict"))
    assert list(tensors) == ["a"] and others == ["meta"]
    from_numpy = source_state_dict({"model": {"a": np.ones(2)}}, "f", "x")[0]["a"]  # detectron2 .pkl-style arrays
    assert torch.equal(from_numpy, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="'b' is a str, not a tensor|entry 'b' is a str"):
        source_state_dict({"model": {"a": w, "b": "text"}}, "f", "x")
    with pytest.raises(ValueError, match="holds a list"):
        source_state_dict([w], "f", "x")


def test_pca_file_checked(v1, tmp_path):
    src = v1.src
    comp, mean = src["mask_encoding.components"], src["mask_encoding.means"]
    var = src["mask_encoding.explained_variances"]

    def npz(name, c, m, v):
        np.savez(tmp_path / name, components_c=c.numpy()[None], mean_c=m.numpy()[None],
                 ratio_c=(v / v.sum()).numpy()[None], explained_variance_c=v.numpy()[None])
        return tmp_path / name

    out = tmp_path / "m.safetensors"
    good = npz("pca60.npz", comp, mean, var)
    with pytest.raises(ValueError, match="l=40 components.*60-d"):
        convert(v1.ckpt, "istr-v1", pca_path=npz("pca40.npz", comp[:40], mean, var[:40]), out=out)
    with pytest.raises(ValueError, match="does not match the PCA stored"):
        convert(v1.ckpt, "istr-v1", pca_path=npz("other.npz", comp.flip(0), mean, var), out=out)
    with pytest.raises(ValueError, match="not a readable PCA"):
        convert(v1.ckpt, "istr-v1", pca_path=truncated(good, tmp_path / "h.npz"), out=out)
    np.savez(tmp_path / "pca112.npz", components_c=np.zeros((1, 60, 112 * 112), np.float32),
             mean_c=np.zeros((1, 112 * 112), np.float32), explained_variance_c=np.ones((1, 60), np.float32))
    with pytest.raises(ValueError, match="28x28"):
        convert(v1.ckpt, "istr-v1", pca_path=tmp_path / "pca112.npz", out=out)
    assert not out.exists()
    # a checkpoint without its stored PCA takes it from the file, and needs it
    no_pca = {k: v for k, v in src.items() if not k.startswith("mask_encoding.")}
    torch.save({"model": no_pca}, tmp_path / "nopca.pth")  # (views into the pools: they are saved whole)
    with pytest.raises(ValueError, match="stores no PCA"):
        convert(tmp_path / "nopca.pth", "istr-v1", out=out)
    model, report = convert(tmp_path / "nopca.pth", "istr-v1", pca_path=good)  # (the file, checked, fits too)
    assert torch.equal(model.codec.components, comp) and report.filled["codec.components"] == "PCA file: components_c"
    assert "<pca file: ratio_c>" in report.dropped


def test_other_layouts_named(tmp_path):
    def v2(sd):  # ISTR v2: the mask branch is a RoI conv head with BN
        for i in range(6):
            sd[f"head.head_series.{i}.mask_module.0.weight"] = torch.zeros(256, 256, 4, 4)
            sd[f"head.head_series.{i}.mask_module.1.running_mean"] = torch.zeros(256)

    istr_v1_checkpoint(tmp_path / "v2.pth", edit=v2, values=False)
    with pytest.raises(ValueError, match="ISTR v2"):
        convert(tmp_path / "v2.pth", "istr-v1")

    def refine(sd):
        for k in [k for k in sd if k.startswith("bbox_embed.")]:
            sd["transformer.decoder." + k] = sd[k]

    dd_checkpoint(tmp_path / "refine.pth", edit=refine, values=False)
    with pytest.raises(ValueError, match="box refinement"):
        convert(tmp_path / "refine.pth", "deformable-detr")

    def two_stage(sd):
        del sd["query_embed.weight"], sd["transformer.reference_points.weight"], sd["transformer.reference_points.bias"]
        sd["transformer.enc_output.weight"] = torch.zeros(256, 256)
        sd["transformer.pos_trans.weight"] = torch.zeros(512, 512)

    dd_checkpoint(tmp_path / "two.pth", edit=two_stage, values=False)
    with pytest.raises(ValueError, match="two-stage"):
        convert(tmp_path / "two.pth", "deformable-detr")
    def single_scale(sd):  # Deformable DETR (single scale): one level, from C5
        for k in [k for k in sd if k.startswith("input_proj.")]:
            del sd[k]
        sd["input_proj.0.0.weight"], sd["transformer.level_embed"] = torch.zeros(256, 2048, 1, 1), torch.zeros(1, 256)

    dd_checkpoint(tmp_path / "ss.pth", edit=single_scale, values=False)
    with pytest.raises(ValueError, match="1 feature level"):
        convert(tmp_path / "ss.pth", "deformable-detr")
    dd_checkpoint(tmp_path / "dc5.pth", args={"dilation": True}, values=False)  # the stored args are checked too
    with pytest.raises(ValueError, match="dilation=True"):
        convert(tmp_path / "dc5.pth", "deformable-detr")


# ---------------------------------------------------------------------------------------------------- init + CLI
def test_load_init_from_source_and_from_model_file(v1, dd):
    src = dd.src
    model = istr.create_model("isda_r50", num_classes=20)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("class_embed.", "kernel_head."))}
    report = load_init(model, dd.ckpt)
    state = model.state_dict()
    assert report.source == "deformable-detr"
    assert torch.equal(state["transformer.level_embed"], src["transformer.level_embed"])
    assert all(torch.equal(state[k], v) for k, v in before.items())  # 20 classes: class head kept, ISDA parts kept
    assert "class_embed.weight" in report.fresh
    if "backbone.neck.lateral.1.0.bias" not in state:  # isda_r50's neck has no conv bias: the official one is dropped
        assert "input_proj.0.0.bias" in report.dropped and any("biases dropped" in n for n in report.notes)
    # a converted ISTR model file into an ISTR of 20 classes: everything but the class logits layers
    target = istr.create_model("istr_r50_fpn_pca60", num_classes=20,
                               codec=istr.create_codec("pca", mask_size=28, dim=60, whiten=True, logit_space=True))
    report = load_init(target, v1.file)
    assert set(report.fresh) == {f"stages.{i}.class_branch.9.{p}" for i in range(6) for p in ("weight", "bias")}
    assert target.codec.is_fitted
    with pytest.raises(ValueError, match="shape mismatches"):
        load_init(istr.create_model("isda_tiny"), dd.ckpt)


def test_cli_main(dd, tmp_path, capsys):
    code = cli_main([str(dd.ckpt), "--from", "deformable-detr", "--out", str(tmp_path / "i.safetensors"),
                     "--report", str(tmp_path / "r.json")])
    assert code == 0 and (tmp_path / "i.safetensors").is_file()
    assert "freshly initialised" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["source"] == "deformable-detr"
    code = cli_main([str(dd.ckpt), "--from", "istr-v1", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "istr convert: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
