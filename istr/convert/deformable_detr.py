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
The same model in mmdetection 2.x's layout is read too, because ISDA's config names exactly such a file
(load_from = deformable_detr_r50_16x2_50e_coco_20210419_220030-a12b9512.pth, mmdetection's model zoo):
{"meta", "state_dict"} with backbone.{conv1,bn1,layer1..4}.* (mmdet ResNet: torchvision names, plain BN with
num_batches_tracked), neck.convs.{0,1,2}.{conv.weight, gn.*} and neck.extra_convs.0.{conv.weight, gn.*} (ConvModule:
no conv bias before GroupNorm), bbox_head.transformer.{level_embeds, reference_points}, bbox_head.transformer.
{encoder,decoder}.layers.N.{attentions.K.*, norms.K.*, ffns.0.layers.{0.0,1}.*} (mmcv BaseTransformerLayer, post-norm
in operation order; the decoder's self-attention is attentions.0.attn, an nn.MultiheadAttention),
bbox_head.query_embedding.weight [300, 512] (query_pos | content), bbox_head.cls_branches.N (one shared Linear
256 -> 80, contiguous COCO labels) and bbox_head.reg_branches.N (box MLP).
Other layouts are refused with their name: box refinement (transformer.decoder.bbox_embed.*, unshared heads),
two-stage (transformer.enc_output*, pos_trans*, no query_embed), DETR (no transformer.level_embed), another number
of feature levels (the single-scale release), other mmdetection models (roi_head.*, no bbox_head.transformer).

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
  mmdetection's head has 80 contiguous logits already: copied as they are.
- Dropped: bbox_embed / reg_branches (ISDA predicts no boxes), BN num_batches_tracked counters (mmdet), the
  optimizer, lr_scheduler, epoch and args entries (args is checked: num_feature_levels 4, no two_stage, no
  with_box_refine, no dilation, no masks) or mmdet's meta (its CLASSES, when present, must be COCO's 80).
- Neck conv biases: the official input_proj convs have them, ISDA's (and mmdet's) ConvModule + GroupNorm have none.
  From an official file convert() builds isda_r50 with neck_options={"bias": True, "first_kaiming": True} (stored
  in the model's config) so the level features are exactly Deformable DETR's; load_init into a bias-free model
  drops them (listed). A model with biases converted from an mmdet file gets zero biases (the same function).
- Freshly initialised by isda_r50's constructor, as the authors' ISDA initialises them: backbone.neck.lateral.0.*
  (P2 1x1 conv, kaiming-normal fan_out; GroupNorm 1/0), mask_features.* (the MFR) and kernel_head.* (kernel MLP).
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
             "epoch": "training progress (epoch)", "args": "training arguments (checked, not stored)",
             "meta": "mmdetection metadata (config text, class names: checked, not stored)"}
OFFICIAL, MMDET = "official", "mmdetection"
LEVEL_KEYS = ("transformer.level_embed", "bbox_head.transformer.level_embeds")
FRESH_PREFIXES = {"backbone.neck.lateral.0.": "P2 lateral conv + GroupNorm (Deformable DETR has no stride-4 level): "
                                             "isda_r50's own initialisation",
                  "mask_features.": "mask feature representation (MFR): ISDA's own module",
                  "kernel_head.": "position-aware kernel MLP: ISDA's own module"}


def detect_deformable_detr(keys: Sequence[str], path: str | Path,
                           shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """'official' (fundamentalvision) or 'mmdetection' (mmdet 2.x) for a single-stage, 4-level Deformable DETR
    without box refinement; ValueError naming the layout found otherwise (shapes: key -> shape, for the levels)."""
    keyset = set(keys)
    shapes = shapes or {}

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keyset)

    mmdet = has("bbox_head.") or has("neck.") or has("roi_head.")
    t = "bbox_head.transformer." if mmdet else "transformer."
    found = None
    if mmdet and not has("bbox_head.transformer."):
        found = "an mmdetection checkpoint of another model (no bbox_head.transformer.*; e.g. roi_head.* of an R-CNN)"
    elif has("backbone.bottom_up."):
        found = "a detectron2 checkpoint (backbone.bottom_up.*; an ISTR v1 file? use source='istr-v1')"
    elif has(t + "decoder.bbox_embed.") or has(t + "decoder.class_embed."):
        found = ("a Deformable DETR with iterative box refinement (transformer.decoder.bbox_embed.*)"
                 + (" and two-stage" if has(t + "enc_output") else ""))
    elif has(t + "enc_output") or has(t + "pos_trans"):
        found = "a two-stage Deformable DETR (transformer.enc_output*, transformer.pos_trans*)"
    elif has(t) and (t + "level_embed" if not mmdet else t + "level_embeds") not in keyset:
        found = "a single-scale (original) DETR (no transformer.level_embed)"
    elif any(len(shapes.get(k, ())) == 2 and shapes[k][0] != 4 for k in LEVEL_KEYS):
        lv = next(shapes[k][0] for k in LEVEL_KEYS if k in shapes)
        found = f"a Deformable DETR with {lv} feature level{'s' if lv != 1 else ''} (the single-scale model?); " \
                "ISDA's has 4"
    elif has("bbox_attention.") or has("mask_head."):
        found = "a DETR segmentation checkpoint (bbox_attention / mask_head)"
    elif not mmdet and (not has("backbone.0.body.") or "query_embed.weight" not in keyset
                        or "transformer.reference_points.weight" not in keyset):
        found = f"keys such as {sorted(keyset)[:5]}"
    elif mmdet and (not has("backbone.layer1.") or "bbox_head.query_embedding.weight" not in keyset
                    or t + "reference_points.weight" not in keyset or not has("neck.convs.")):
        found = f"an mmdetection checkpoint with keys such as {sorted(keyset)[:5]}"
    if found is not None:
        raise ValueError(f"{path} is not a {WHAT}: expected backbone.0.body.*, input_proj.*, transformer.encoder/"
                         f"decoder.layers.*, query_embed, transformer.reference_points, class_embed, bbox_embed "
                         f"(or their mmdetection 2.x names); found {found}")
    return MMDET if mmdet else OFFICIAL


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


def _target_key_mmdet(key: str) -> str | None:
    if m := re.fullmatch(r"backbone\.((?:conv1|bn1|layer[1-4])\..+)", key):
        return "backbone.body." + m.group(1)
    if m := re.fullmatch(r"neck\.(?:convs\.([0-2])|extra_convs\.0)\.(conv|gn)\.(weight|bias)", key):
        where = f"lateral.{int(m.group(1)) + 1}" if m.group(1) is not None else "extra.0"
        return f"backbone.neck.{where}.{0 if m.group(2) == 'conv' else 1}.{m.group(3)}"
    if key == "bbox_head.transformer.level_embeds":
        return "transformer.level_embed"
    if key in ("bbox_head.transformer.reference_points.weight", "bbox_head.transformer.reference_points.bias"):
        return key[len("bbox_head."):]
    if key == "bbox_head.query_embedding.weight":
        return "transformer.query_embedding.weight"
    m = re.fullmatch(r"bbox_head\.transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
    if m is None:
        return None
    part, layer, rest = m.groups()
    new = None
    msda = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
    if part == "encoder" and (mm := re.fullmatch(r"attentions\.0\." + msda, rest)):
        new = f"self_attn.{mm.group(1)}.{mm.group(2)}"
    elif part == "decoder" and (mm := re.fullmatch(r"attentions\.1\." + msda, rest)):
        new = f"cross_attn.{mm.group(1)}.{mm.group(2)}"
    elif part == "decoder" and (mm := re.fullmatch(r"attentions\.0\.attn\.(in_proj_weight|in_proj_bias|"
                                                   r"out_proj\.weight|out_proj\.bias)", rest)):
        new = f"self_attn.{mm.group(1)}"
    elif (mm := re.fullmatch(r"norms\.([0-2])\.(weight|bias)", rest)) and \
            int(mm.group(1)) < (2 if part == "encoder" else 3):
        new = f"norm{int(mm.group(1)) + 1}.{mm.group(2)}"  # norms in operation order, as ours
    elif mm := re.fullmatch(r"ffns\.0\.layers\.0\.0\.(weight|bias)", rest):
        new = f"ffn.0.{mm.group(1)}"
    elif mm := re.fullmatch(r"ffns\.0\.layers\.1\.(weight|bias)", rest):
        new = f"ffn.3.{mm.group(1)}"
    return None if new is None else f"transformer.{part}.{layer}.{new}"


CLASS_KEY = {OFFICIAL: r"class_embed\.\d+\.(weight|bias)", MMDET: r"bbox_head\.cls_branches\.\d+\.(weight|bias)"}
BOX_KEY = {OFFICIAL: r"bbox_embed\.\d+\.layers\.\d+\.(weight|bias)",
           MMDET: r"bbox_head\.reg_branches\.\d+\.\d+\.(weight|bias)"}
NECK_BIASES = ("backbone.neck.lateral.1.0.bias", "backbone.neck.lateral.2.0.bias", "backbone.neck.lateral.3.0.bias",
               "backbone.neck.extra.0.0.bias")


def convert_deformable_detr_state(src: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor], *,
                                  path: str | Path = "<checkpoint>", layout: str = OFFICIAL,
                                  report: ConversionReport | None = None
                                  ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a Deformable DETR state dict (layout 'official' or 'mmdetection') onto an ISDA model's state_dict()
    keys -> (tensors, report); ValueError for any key it cannot account for."""
    report = report or ConversionReport(SOURCE, str(path), "ISDA")
    mapper = _target_key if layout == OFFICIAL else _target_key_mmdet
    out: dict[str, torch.Tensor] = {}
    unknown = []
    class_keys = [k for k in src if re.fullmatch(CLASS_KEY[layout], k)]
    for key, value in src.items():
        if key in class_keys:
            continue
        if re.fullmatch(BOX_KEY[layout], key):
            report.dropped[key] = "box head (ISDA predicts no boxes)"
            continue
        if layout == MMDET and key.endswith(".num_batches_tracked"):
            report.dropped[key] = "BatchNorm update counter (the backbone's BNs are frozen here)"
            continue
        new = mapper(key)
        if new is None:
            unknown.append(key)
            continue
        report.mapped[key] = new
        out[new] = value
    if unknown:
        raise ValueError(f"{path}: keys with no counterpart in ISDA: {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                         f"({len(unknown)} in all)")
    for key in NECK_BIASES:
        if key in target_state and key not in out:  # mmdet's ConvModule before GroupNorm has no bias: zero is the same
            out[key] = torch.zeros_like(target_state[key])
            report.filled[key] = "zeros (the checkpoint's neck conv has no bias)"
        elif key in out and key not in target_state:  # the official input_proj has one, this model's neck not
            src_key = next(k for k, v in report.mapped.items() if v == key)
            del out[key], report.mapped[src_key]
            report.dropped[src_key] = ("conv bias before GroupNorm: the model's neck has none (a bias-free neck "
                                       "computes slightly different level features; convert() keeps it exactly)")
            if not any("neck conv biases dropped" in n for n in report.notes):
                report.notes.append("neck conv biases dropped: this model's channel mapper has no bias")
    fresh = {k: why for k in target_state for p, why in FRESH_PREFIXES.items() if k.startswith(p)}
    _class_head(src, class_keys, target_state, out, fresh, report, path, layout)
    fill_target(target_state, out, fresh, path, WHAT)
    converted = {k: as_target_dtype(v, target_state[k]) for k, v in out.items()}
    for src_key, dst in report.mapped.items():
        report.filled.setdefault(dst, src_key)
    report.fresh.update(fresh)
    return converted, report


def _class_head(src: Mapping[str, torch.Tensor], class_keys: list[str], target_state: Mapping[str, torch.Tensor],
                out: dict[str, torch.Tensor], fresh: dict[str, str], report: ConversionReport, path: str | Path,
                layout: str) -> None:
    """The class head, one Linear listed once per decoder layer (official: 91 rows indexed by COCO id; mmdet: 80
    contiguous rows) -> class_embed (80 contiguous rows), or fresh for another number of classes."""
    weights = sorted(k for k in class_keys if k.endswith(".weight"))
    if not weights:
        raise ValueError(f"{path}: no class head ({CLASS_KEY[layout]}) in the checkpoint")
    first = weights[0][:-len(".weight")]
    w0, b0 = src[first + ".weight"], src[first + ".bias"]
    for k in class_keys:
        if not torch.equal(src[k], w0 if k.endswith(".weight") else b0):
            raise ValueError(f"{path}: {k} differs from {first}: the class heads are not shared (a box-refinement "
                             "Deformable DETR), not the single-stage model")
    target_rows = target_state["class_embed.weight"].shape[0] if "class_embed.weight" in target_state else None
    rows = w0.shape[0]
    if target_rows == 80 and rows in (80, 91):
        if rows == 91:
            ids = torch.tensor(COCO_CATEGORY_IDS)
            out["class_embed.weight"], out["class_embed.bias"] = w0[ids], b0[ids]
            where = "rows at the 80 COCO ids"
            unused = sorted(set(range(91)) - set(COCO_CATEGORY_IDS))
            report.dropped["<class_embed rows>"] = f"the 11 logits of unused COCO ids {unused}"
            report.conventions.append("classes: Deformable DETR's 91 logits are indexed by COCO category id; ISDA's "
                                      "80 labels are the ids in sorted order, so row j <- row COCO_CATEGORY_IDS[j]")
        else:
            out["class_embed.weight"], out["class_embed.bias"] = w0, b0
            where = "80 contiguous rows, as they are"
            report.conventions.append("classes: mmdetection's 80 logits are already the contiguous COCO labels")
        for k in class_keys:
            report.mapped[k] = "class_embed." + k.rsplit(".", 1)[1]
        report.filled["class_embed.weight"] = f"{first}.weight ({where})"
        report.filled["class_embed.bias"] = f"{first}.bias ({where})"
    else:
        for k in class_keys:
            report.dropped[k] = (f"class head of {rows} logits; the model has {target_rows} classes, "
                                 "so its class head is freshly initialised")
        for k in ("class_embed.weight", "class_embed.bias"):
            if k in target_state:
                fresh[k] = "class head (prior 0.01 bias): the checkpoint's classes do not map onto the model's"


def check_meta(meta: Any, path: str | Path) -> None:
    """mmdetection's meta: its CLASSES, when stored, must be COCO's 80 (in COCO's order)."""
    classes = meta.get("CLASSES") if isinstance(meta, Mapping) else None
    if classes is not None:
        names = [c["name"] for c in COCO_CATEGORIES]
        if list(classes) != names:
            raise ValueError(f"{path} was trained on {len(classes)} classes ({list(classes)[:3]}...), not COCO's 80 "
                             "in COCO order")


def convert_deformable_detr(path: str | Path, *, model_name: str | None = None, num_classes: int = 80,
                            trust_pickle: bool = False) -> tuple[Any, ConversionReport]:
    """A single-stage R50 Deformable DETR checkpoint (official or mmdetection 2.x) -> (isda_r50 with its matching
    parts filled, in eval mode, report)."""
    import istr

    model_name = model_name or "isda_r50"
    if model_name != "isda_r50":
        raise ValueError(f"model_name must be 'isda_r50' for {SOURCE} (the R50 ISDA the checkpoint fits), "
                         f"got {model_name!r}")
    ckpt = load_source_checkpoint(path, WHAT, trust_pickle)
    src, top = source_state_dict(ckpt, path, WHAT, entries=("model", "state_dict"))
    layout = detect_deformable_detr(list(src), path, {k: tuple(v.shape) for k, v in src.items()})
    dropped = top_level_dropped(top, TOP_LEVEL, path, WHAT)
    args_seen = check_args(ckpt.get("args"), path)
    if layout == MMDET:
        check_meta(ckpt.get("meta"), path)
    model = istr.create_model(model_name, num_classes=num_classes)
    if layout == OFFICIAL and NECK_BIASES[0] not in model.state_dict():
        # the official input_proj convs have biases (ISDA's own neck, like mmdet's, has none): keep them, exactly
        model = istr.create_model(model_name, num_classes=num_classes,
                                  neck_options={"bias": True, "first_kaiming": True})
    report = ConversionReport(SOURCE, str(path), model_name, dropped=dict(dropped))
    converted, report = convert_deformable_detr_state(src, model.state_dict(), path=path, layout=layout, report=report)
    state = model.state_dict()
    state.update(converted)
    model.load_state_dict(state)
    if num_classes == 80:
        model.categories = [dict(c) for c in COCO_CATEGORIES]
    report.notes.append(f"layout: {layout}")
    if args_seen:
        report.notes.append("checkpoint args: " + ", ".join(args_seen))
    report.conventions += [
        "pixels: RGB [0, 1] with ImageNet mean/std in both codes: unchanged",
        "FrozenBN: the ResNet's weight/bias/running_mean/running_var -> the timm ResNet's frozen BN (eps 1e-5)",
        "levels: the source's 4 levels (C3, C4, C5 1x1; C5 3x3 s2) -> channel mapper P3..P6; P2 is ISDA's own (fresh)",
        "decoder norms in execution order (official DD: norm2 after self-attention -> norm1, norm1 -> norm2)",
        "no background class (sigmoid focal logits in both); the box head is dropped"]
    return model.eval(), report
