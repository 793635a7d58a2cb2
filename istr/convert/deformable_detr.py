"""Deformable DETR (fundamentalvision/Deformable-DETR, single-stage, no box refinement) COCO checkpoints -> isda_r50.

ISDA does not start from ImageNet: its config (yingkaining/isda, configs/isda/isda_r50_3x_coco.py) loads a
COCO-trained R50 Deformable DETR (`load_from`, non-strict: parameters with matching names and shapes load, the rest
keep their initialisation). This converter gives isda_r50 the same start from the official release
(r50_deformable_detr-checkpoint.pth; {"model", "optimizer", "lr_scheduler", "epoch", "args"}).

Source layout (read from Deformable-DETR @11169a6 models/{deformable_detr,deformable_transformer,backbone}.py):
- backbone.0.body.{conv1, bn1, layer1..4}.*: torchvision ResNet-50 (IntermediateLayerGetter, no fc) with DETR's
  FrozenBatchNorm2d (buffers weight, bias, running_mean, running_var; eps 1e-5). backbone.1 (sine position
  encoding) has no weights.
- input_proj.{0,1,2}.{0: Conv2d 1x1 from C3/C4/C5, 1: GroupNorm(32)}, input_proj.3.{0: Conv2d 3x3 s2 from C5,
  1: GroupNorm(32)}: the four transformer levels (strides 8..64).
- transformer.level_embed [4, 256]; transformer.encoder.layers.N.{self_attn (MSDeformAttn: sampling_offsets,
  attention_weights, value_proj, output_proj), norm1, linear1, linear2, norm2}; transformer.decoder.layers.N.
  {self_attn (nn.MultiheadAttention) then norm2, cross_attn (MSDeformAttn) then norm1, linear1, linear2, norm3};
  transformer.reference_points (Linear 256 -> 2); query_embed.weight [300, 512] = [query_pos | content].
- class_embed.{0..5} (one Linear 256 -> 91 shared by the 6 decoder layers: the state dict repeats it) and
  bbox_embed.{0..5}.layers.{0,1,2} (shared MLP).
Other layouts are refused with their name: box refinement (transformer.decoder.bbox_embed.*, unshared heads),
two-stage (transformer.enc_output*, pos_trans*, no query_embed), a single-scale DETR (no transformer.level_embed),
mmdetection files (state_dict + meta; bbox_head.*).

Mapping onto isda_r50 (P2 from C2, P3..P5 from C3..C5, P6 from C5; the transformer sees P3..P6):
- backbone.0.body.* -> backbone.body.* (the same torchvision names in timm's ResNet); input_proj.{0,1,2} ->
  backbone.neck.lateral.{1,2,3}; input_proj.3 -> backbone.neck.extra.0; encoder/decoder layers -> transformer.
  encoder/decoder.N (decoder norm2 -> norm1 and norm1 -> norm2: ours are numbered in execution order; linear1/2 ->
  ffn.0/ffn.3); query_embed -> transformer.query_embedding (same [query_pos | content] split); reference_points and
  level_embed as they are.
- class_embed: Deformable DETR's COCO head has 91 sigmoid logits indexed by the raw COCO category id (ids 0, 12,
  26, 29, 30, 45, 66, 68, 69, 71, 83 are never used); ISDA's 80 contiguous labels are the COCO ids in sorted
  order. For an 80-class model row j of the new head = row COCO_CATEGORY_IDS[j] of the old, which is the head
  ISDA inherits in the authors' code (mmdetection's 80-class Deformable DETR head under the same names). The 11
  unused rows are dropped. For another number of classes the head is freshly initialised (prior 0.01).
- Dropped: bbox_embed (ISDA predicts no boxes), the optimizer, lr_scheduler, epoch and args entries (args is
  checked: num_feature_levels 4, no two_stage, no with_box_refine, no dilation, no masks).
- Freshly initialised by isda_r50's constructor, as the authors' ISDA initialises them: backbone.neck.lateral.0.*
  (P2 1x1 conv: Xavier-uniform, zero bias; GroupNorm 1/0), mask_features.* (the MFR) and kernel_head.* (kernel MLP).
Pixels: RGB in [0, 1] normalised with ImageNet mean/std in both (torchvision's Normalize): nothing to convert.
Boxes: Deformable DETR's normalised (cx, cy, w, h) boxes are not used (no box head). No background class (focal).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from istr.convert.common import (COCO_CATEGORIES, COCO_CATEGORY_IDS, ConversionReport, as_target_dtype, fill_target,
                                 load_source_checkpoint, source_state_dict, top_level_dropped)

__all__ = ["SOURCE", "convert_deformable_detr", "convert_deformable_detr_state", "detect_deformable_detr"]

SOURCE = "deformable-detr"
WHAT = "Deformable DETR checkpoint (single-stage, no box refinement)"
TOP_LEVEL = {"optimizer": "optimizer state (not transferred)", "lr_scheduler": "lr scheduler state (not transferred)",
             "epoch": "training progress (epoch)", "args": "training arguments (checked, not stored)"}
FRESH_PREFIXES = {"backbone.neck.lateral.0.": "P2 lateral conv + GroupNorm (Deformable DETR has no stride-4 level): "
                                             "Xavier-uniform conv, zero bias",
                  "mask_features.": "mask feature representation (MFR): ISDA's own module",
                  "kernel_head.": "position-aware kernel MLP: ISDA's own module"}


def detect_deformable_detr(keys: Sequence[str], path: str | Path) -> None:
    """ValueError naming the layout found unless the keys are a single-stage Deformable DETR without refinement."""
    keyset = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keyset)

    found = None
    if has("bbox_head.") or has("neck.") or has("backbone.conv1"):
        found = "an mmdetection-format checkpoint (backbone.* / neck.* / bbox_head.* keys)"
    elif has("backbone.bottom_up."):
        found = "a detectron2 checkpoint (backbone.bottom_up.*; an ISTR v1 file? use source='istr-v1')"
    elif has("transformer.decoder.bbox_embed.") or has("transformer.decoder.class_embed."):
        found = ("a Deformable DETR with iterative box refinement (transformer.decoder.bbox_embed.*)"
                 + (" and two-stage" if has("transformer.enc_output") else ""))
    elif has("transformer.enc_output") or has("transformer.pos_trans"):
        found = "a two-stage Deformable DETR (transformer.enc_output*, transformer.pos_trans*)"
    elif has("transformer.") and "transformer.level_embed" not in keyset:
        found = "a single-scale (original) DETR (no transformer.level_embed)"
    elif not has("backbone.0.body.") or "query_embed.weight" not in keyset or \
            "transformer.reference_points.weight" not in keyset:
        found = f"keys such as {sorted(keyset)[:5]}"
    elif has("bbox_attention.") or has("mask_head."):
        found = "a DETR segmentation checkpoint (bbox_attention / mask_head)"
    if found is not None:
        raise ValueError(f"{path} is not a {WHAT}: expected backbone.0.body.*, input_proj.*, transformer.encoder/"
                         f"decoder.layers.*, query_embed, transformer.reference_points, class_embed, bbox_embed; "
                         f"found {found}")


def check_args(args: Any, path: str | Path) -> list[str]:
    """The training args stored with the checkpoint, checked against the layout this converter handles."""
    if args is None:
        return []
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
    problems = []
    for key, want in (("two_stage", False), ("with_box_refine", False), ("dilation", False), ("masks", False),
                      ("num_feature_levels", 4), ("backbone", "resnet50"), ("dec_n_points", 4),
                      ("enc_n_points", 4)):
        if key in values and values[key] != want:
            problems.append(f"{key}={values[key]!r} (expected {want!r})")
    if problems:
        raise ValueError(f"{path} was trained with {', '.join(problems)}: not the single-stage R50 Deformable DETR "
                         "that isda_r50 starts from")
    return [f"{k}={values[k]!r}" for k in ("num_queries", "hidden_dim", "dim_feedforward", "enc_layers", "dec_layers",
                                           "nheads") if k in values]


def _target_key(key: str) -> str | None:
    if key.startswith("backbone.0.body."):
        return "backbone.body." + key[len("backbone.0.body."):]
    if m := re.fullmatch(r"input_proj\.([0-3])\.([01])\.(weight|bias)", key):
        level = int(m.group(1))
        where = f"lateral.{level + 1}" if level < 3 else "extra.0"
        return f"backbone.neck.{where}.{m.group(2)}.{m.group(3)}"
    if key in ("transformer.level_embed", "transformer.reference_points.weight", "transformer.reference_points.bias"):
        return key
    if key == "query_embed.weight":
        return "transformer.query_embedding.weight"
    if m := re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|"
                         r"in_proj_bias)", key):
        part, layer, module, param = m.groups()
        renames = {"linear1": "ffn.0", "linear2": "ffn.3"}
        if part == "decoder":
            renames.update({"norm2": "norm1", "norm1": "norm2"})  # DD numbers them by creation, ours by execution
        module = renames.get(module, module)
        return f"transformer.{part}.{layer}.{module}.{param}"
    return None


def convert_deformable_detr_state(src: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor], *,
                                  path: str | Path = "<checkpoint>", report: ConversionReport | None = None
                                  ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a Deformable DETR `model` state dict onto an ISDA model's state_dict() keys -> (tensors, report)."""
    report = report or ConversionReport(SOURCE, str(path), "ISDA")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    class_keys = [k for k in src if re.fullmatch(r"class_embed\.\d+\.(weight|bias)", k)]
    for key, value in src.items():
        if key in class_keys:
            continue
        if re.fullmatch(r"bbox_embed\.\d+\.layers\.\d+\.(weight|bias)", key):
            report.dropped[key] = "box head (ISDA predicts no boxes)"
            continue
        new = _target_key(key)
        if new is None:
            unknown.append(key)
            continue
        report.mapped[key] = new
        out[new] = value
    if unknown:
        raise ValueError(f"{path}: keys with no counterpart in ISDA: {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                         f"({len(unknown)} in all)")
    fresh = {k: why for k in target_state for p, why in FRESH_PREFIXES.items() if k.startswith(p)}
    _class_head(src, class_keys, target_state, out, fresh, report, path)
    fill_target(target_state, out, fresh, path, WHAT)
    converted = {k: as_target_dtype(v, target_state[k]) for k, v in out.items()}
    for src_key, dst in report.mapped.items():
        report.filled.setdefault(dst, src_key)
    report.fresh.update(fresh)
    return converted, report


def _class_head(src: Mapping[str, torch.Tensor], class_keys: list[str], target_state: Mapping[str, torch.Tensor],
                out: dict[str, torch.Tensor], fresh: dict[str, str], report: ConversionReport, path: str | Path) -> None:
    """class_embed.{0..5} (one shared Linear, 91 COCO-id rows) -> class_embed (80 contiguous rows) or fresh."""
    weights = sorted(k for k in class_keys if k.endswith(".weight"))
    if not weights:
        raise ValueError(f"{path}: no class_embed.N.weight (the Deformable DETR class head)")
    w0, b0 = src[weights[0]], src[weights[0][:-len("weight")] + "bias"]
    for k in class_keys:
        ref = w0 if k.endswith(".weight") else b0
        if not torch.equal(src[k], ref):
            raise ValueError(f"{path}: {k} differs from {weights[0][:-len('.weight')]}: the class heads are not shared "
                             "(a box-refinement Deformable DETR), not the single-stage model")
    target_rows = target_state["class_embed.weight"].shape[0] if "class_embed.weight" in target_state else None
    if w0.shape[0] == 91 and target_rows == 80:
        ids = torch.tensor(COCO_CATEGORY_IDS)
        out["class_embed.weight"], out["class_embed.bias"] = w0[ids], b0[ids]
        for k in class_keys:
            report.mapped[k] = "class_embed." + k.rsplit(".", 1)[1]  # rows at the 80 COCO ids (see filled)
        report.filled["class_embed.weight"] = f"{weights[0]} rows [COCO ids]"
        report.filled["class_embed.bias"] = f"{weights[0][:-len('weight')]}bias rows [COCO ids]"
        unused = sorted(set(range(91)) - set(COCO_CATEGORY_IDS))
        report.dropped["<class_embed rows>"] = f"the 11 logits of unused COCO ids {unused}"
        report.conventions.append("classes: Deformable DETR's 91 logits are indexed by COCO category id; ISDA's "
                                  "80 labels are the ids in sorted order, so row j <- row COCO_CATEGORY_IDS[j]")
    else:
        for k in class_keys:
            report.dropped[k] = (f"class head of {w0.shape[0]} logits; the model has {target_rows} classes, "
                                 "so its class head is freshly initialised")
        for k in ("class_embed.weight", "class_embed.bias"):
            if k in target_state:
                fresh[k] = "class head (prior 0.01 bias): the checkpoint's classes do not map onto the model's"


def convert_deformable_detr(path: str | Path, *, model_name: str | None = None, num_classes: int = 80,
                            trust_pickle: bool = False) -> tuple[Any, ConversionReport]:
    """The official R50 Deformable DETR checkpoint -> (isda_r50 with its matching parts filled, in eval mode, report)."""
    import istr

    model_name = model_name or "isda_r50"
    if model_name != "isda_r50":
        raise ValueError(f"model_name must be 'isda_r50' for {SOURCE} (the R50 ISDA the checkpoint fits), "
                         f"got {model_name!r}")
    ckpt = load_source_checkpoint(path, WHAT, trust_pickle)
    src, top = source_state_dict(ckpt, path, WHAT)
    detect_deformable_detr(list(src), path)
    dropped = top_level_dropped(top, TOP_LEVEL, path, WHAT)
    args_seen = check_args(ckpt.get("args"), path)
    model = istr.create_model(model_name, num_classes=num_classes)
    report = ConversionReport(SOURCE, str(path), model_name, dropped=dict(dropped))
    converted, report = convert_deformable_detr_state(src, model.state_dict(), path=path, report=report)
    state = model.state_dict()
    state.update(converted)
    model.load_state_dict(state)
    if num_classes == 80:
        model.categories = [dict(c) for c in COCO_CATEGORIES]
    if args_seen:
        report.notes.append("checkpoint args: " + ", ".join(args_seen))
    report.conventions += [
        "pixels: RGB [0, 1] with ImageNet mean/std in both codes: unchanged",
        "FrozenBN: DETR FrozenBatchNorm2d weight/bias/running_mean/running_var -> the timm ResNet's frozen BN (eps 1e-5)",
        "levels: input_proj 0..3 (C3, C4, C5, C5 3x3 s2) -> channel mapper P3..P6; P2 is ISDA's own (fresh)",
        "decoder norms renumbered by execution order (DD norm2 after self-attention -> norm1, norm1 -> norm2)",
        "no background class (sigmoid focal logits in both); the box head is dropped"]
    return model.eval(), report
