"""Writes tests/data/manifests/{istr_v1_r50,deformable_detr_r50}.json: the source checkpoints' layouts (key names,
shapes, dtypes) spelled out from the authors' module definitions, independently of istr.convert.

Run once by hand (python tests/convert/make_manifests.py); the tests read the JSON files only.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "manifests"
BN = ("weight", "bias", "running_mean", "running_var")  # FrozenBatchNorm2d buffers (detectron2 and DETR alike)
R50_BLOCKS, WIDTHS = (3, 4, 6, 3), (64, 128, 256, 512)  # bottleneck widths; output = 4 x width


def resnet(prefix: str, naming: str, bn_counter: bool = False) -> dict[str, list[int]]:
    """ResNet-50 keys: naming 'detectron2' (stem / resN / shortcut / convK.norm) or 'torchvision';
    bn_counter: plain BatchNorm2d (mmdet) also stores num_batches_tracked (a scalar)."""
    keys: dict[str, list[int]] = {}
    d2 = naming == "detectron2"

    def conv_bn(conv: str, bn: str, shape: list[int]) -> None:
        keys[f"{prefix}{conv}.weight"] = shape
        for b in BN:
            keys[f"{prefix}{bn}.{b}"] = [shape[0]]
        if bn_counter:
            keys[f"{prefix}{bn}.num_batches_tracked"] = []

    conv_bn("stem.conv1" if d2 else "conv1", "stem.conv1.norm" if d2 else "bn1", [64, 3, 7, 7])
    cin = 64
    for s, (n, w) in enumerate(zip(R50_BLOCKS, WIDTHS)):
        for b in range(n):
            blk = f"res{s + 2}.{b}" if d2 else f"layer{s + 1}.{b}"
            if b == 0:
                conv_bn(f"{blk}.shortcut" if d2 else f"{blk}.downsample.0",
                        f"{blk}.shortcut.norm" if d2 else f"{blk}.downsample.1", [4 * w, cin, 1, 1])
            for k, shape in ((1, [w, cin if b == 0 else 4 * w, 1, 1]), (2, [w, w, 3, 3]), (3, [4 * w, w, 1, 1])):
                conv_bn(f"{blk}.conv{k}", f"{blk}.conv{k}.norm" if d2 else f"{blk}.bn{k}", shape)
        cin = 4 * w
    return keys


def istr_v1() -> dict:
    keys = resnet("backbone.bottom_up.", "detectron2")
    for lvl, c in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        keys[f"backbone.fpn_lateral{lvl}.weight"], keys[f"backbone.fpn_lateral{lvl}.bias"] = [256, c, 1, 1], [256]
        keys[f"backbone.fpn_output{lvl}.weight"], keys[f"backbone.fpn_output{lvl}.bias"] = [256, 256, 3, 3], [256]
    keys["pos_embeddings.weight"], keys["init_proposal_boxes.weight"] = [300, 256], [300, 4]
    keys.update({"mask_encoding.components": [60, 784], "mask_encoding.explained_variances": [60],
                 "mask_encoding.means": [784]})
    for i in range(6):
        h = f"head.head_series.{i}."
        keys.update({h + "self_attn.in_proj_weight": [768, 256], h + "self_attn.in_proj_bias": [768],
                     h + "self_attn.out_proj.weight": [256, 256], h + "self_attn.out_proj.bias": [256],
                     h + "inst_interact.dynamic_layer.weight": [2 * 256 * 64, 256],
                     h + "inst_interact.dynamic_layer.bias": [2 * 256 * 64],
                     h + "inst_interact.norm1.weight": [64], h + "inst_interact.norm1.bias": [64],
                     h + "inst_interact.norm2.weight": [256], h + "inst_interact.norm2.bias": [256],
                     h + "inst_interact.out_layer.weight": [256, 256 * 49], h + "inst_interact.out_layer.bias": [256],
                     h + "inst_interact.norm3.weight": [256], h + "inst_interact.norm3.bias": [256],
                     h + "linear1.weight": [2048, 256], h + "linear1.bias": [2048],
                     h + "linear2.weight": [256, 2048], h + "linear2.bias": [256]})
        for n in (1, 2, 3):
            keys[f"{h}norm{n}.weight"], keys[f"{h}norm{n}.bias"] = [256], [256]
        for mod in ("cls_module", "reg_module", "mask_module"):
            for j in (0, 3, 6):  # Linear(256, 256, bias=False), LayerNorm(256), ELU
                keys[f"{h}{mod}.{j}.weight"] = [256, 256]
                keys[f"{h}{mod}.{j + 1}.weight"], keys[f"{h}{mod}.{j + 1}.bias"] = [256], [256]
        for name, n_out in (("class_logits", 80), ("bboxes_delta", 4), ("mask_logits", 60)):
            keys[f"{h}{name}.weight"], keys[f"{h}{name}.bias"] = [n_out, 256], [n_out]
    return {
        "source": "istr-v1",
        "read_from": ["hujiecpp/ISTR@967c901 projects/ISTR/istr/inseg.py, head.py, MaskEncoding.py, config.py, "
                      "configs/Base-ISTR.yaml, ISTR-R50-3x.yaml",
                      "detectron2 (vendored in the same commit) modeling/backbone/resnet.py, fpn.py, "
                      "layers/batch_norm.py"],
        "facts": {
            "top_level": {"model": "state dict", "iteration": "int (others a trainer may add: optimizer, scheduler)"},
            "dtype": "float32",
            "input": "INPUT.FORMAT RGB, PIXEL_MEAN [123.675, 116.28, 103.53], PIXEL_STD [58.395, 57.12, 57.375], "
                     "0..255 pixels",
            "resnet": "torchvision-style weights, STRIDE_IN_1X1 False, FrozenBN (eps 1e-5), R101 = 23 res4 blocks",
            "pca_file": {"name": "coco_2017_train_class_agnosticTrue_whitenTrue_sigmoidTrue_60_siz28.npz",
                         "arrays": {"components_c": [1, 60, 784], "mean_c": [1, 784], "ratio_c": [1, 60],
                                    "explained_variance_c": [1, 60]}, "dtype": "float32"},
            "classes": "80 sigmoid logits, contiguous ids = COCO ids sorted",
            "query_boxes": "init_proposal_boxes: normalised cx, cy, w, h, init (0.5, 0.5, 1, 1)"},
        "r101_res4_blocks": 23,
        "keys": keys}


def deformable_detr() -> dict:
    keys = resnet("backbone.0.body.", "torchvision")
    for i, c in enumerate((512, 1024, 2048)):
        keys[f"input_proj.{i}.0.weight"], keys[f"input_proj.{i}.0.bias"] = [256, c, 1, 1], [256]
        keys[f"input_proj.{i}.1.weight"], keys[f"input_proj.{i}.1.bias"] = [256], [256]
    keys["input_proj.3.0.weight"], keys["input_proj.3.0.bias"] = [256, 2048, 3, 3], [256]
    keys["input_proj.3.1.weight"], keys["input_proj.3.1.bias"] = [256], [256]
    msda = {"sampling_offsets": 8 * 4 * 4 * 2, "attention_weights": 8 * 4 * 4, "value_proj": 256, "output_proj": 256}
    keys["transformer.level_embed"] = [4, 256]
    for part in ("encoder", "decoder"):
        for i in range(6):
            p = f"transformer.{part}.layers.{i}."
            attn = "self_attn" if part == "encoder" else "cross_attn"
            for name, n_out in msda.items():
                keys[f"{p}{attn}.{name}.weight"], keys[f"{p}{attn}.{name}.bias"] = [n_out, 256], [n_out]
            if part == "decoder":
                keys.update({p + "self_attn.in_proj_weight": [768, 256], p + "self_attn.in_proj_bias": [768],
                             p + "self_attn.out_proj.weight": [256, 256], p + "self_attn.out_proj.bias": [256]})
            for n in ((1, 2) if part == "encoder" else (1, 2, 3)):
                keys[f"{p}norm{n}.weight"], keys[f"{p}norm{n}.bias"] = [256], [256]
            keys.update({p + "linear1.weight": [1024, 256], p + "linear1.bias": [1024],
                         p + "linear2.weight": [256, 1024], p + "linear2.bias": [256]})
    keys["transformer.reference_points.weight"], keys["transformer.reference_points.bias"] = [2, 256], [2]
    for i in range(6):
        keys[f"class_embed.{i}.weight"], keys[f"class_embed.{i}.bias"] = [91, 256], [91]
        for j, n_out in enumerate((256, 256, 4)):
            keys[f"bbox_embed.{i}.layers.{j}.weight"], keys[f"bbox_embed.{i}.layers.{j}.bias"] = [n_out, 256], [n_out]
    keys["query_embed.weight"] = [300, 512]
    return {
        "source": "deformable-detr",
        "read_from": ["fundamentalvision/Deformable-DETR@11169a6 models/deformable_detr.py, deformable_transformer.py, "
                      "backbone.py, main.py (args)",
                      "yingkaining/isda@de2c2f4 configs/isda/isda_r50_3x_coco.py (load_from: a COCO Deformable DETR)"],
        "facts": {
            "top_level": {"model": "state dict", "optimizer": "dict", "lr_scheduler": "dict", "epoch": "int",
                          "args": "argparse.Namespace (two_stage, with_box_refine, num_feature_levels, ...)"},
            "dtype": "float32",
            "input": "RGB [0, 1], ImageNet mean/std (torchvision Normalize)",
            "shared": "single-stage without box refinement: class_embed.N and bbox_embed.N are one module listed "
                      "6 times (identical tensors)",
            "classes": "91 sigmoid logits indexed by COCO category id (num_classes = max id + 1)",
            "query_embed": "[300, 512] = [query_pos | content], split at 256",
            "decoder_norms": "norm2 after self-attention, norm1 after cross-attention, norm3 after the FFN"},
        "shared_groups": ["class_embed.{i}.", "bbox_embed.{i}."],
        "keys": keys}


def deformable_detr_mmdet() -> dict:
    keys = resnet("backbone.", "torchvision", bn_counter=True)
    for i, c in enumerate((512, 1024, 2048)):  # ConvModule(conv without bias, GroupNorm "gn")
        keys[f"neck.convs.{i}.conv.weight"] = [256, c, 1, 1]
        keys[f"neck.convs.{i}.gn.weight"], keys[f"neck.convs.{i}.gn.bias"] = [256], [256]
    keys["neck.extra_convs.0.conv.weight"] = [256, 2048, 3, 3]
    keys["neck.extra_convs.0.gn.weight"], keys["neck.extra_convs.0.gn.bias"] = [256], [256]
    t = "bbox_head.transformer."
    keys[t + "level_embeds"] = [4, 256]
    msda = {"sampling_offsets": 256, "attention_weights": 128, "value_proj": 256, "output_proj": 256}
    for part, n_norms in (("encoder", 2), ("decoder", 3)):
        for i in range(6):
            p = f"{t}{part}.layers.{i}."
            deform = "attentions.0." if part == "encoder" else "attentions.1."
            if part == "decoder":  # mmcv MultiheadAttention wraps nn.MultiheadAttention as .attn
                keys.update({p + "attentions.0.attn.in_proj_weight": [768, 256],
                             p + "attentions.0.attn.in_proj_bias": [768],
                             p + "attentions.0.attn.out_proj.weight": [256, 256],
                             p + "attentions.0.attn.out_proj.bias": [256]})
            for name, n_out in msda.items():
                keys[f"{p}{deform}{name}.weight"], keys[f"{p}{deform}{name}.bias"] = [n_out, 256], [n_out]
            for n in range(n_norms):
                keys[f"{p}norms.{n}.weight"], keys[f"{p}norms.{n}.bias"] = [256], [256]
            keys.update({p + "ffns.0.layers.0.0.weight": [1024, 256], p + "ffns.0.layers.0.0.bias": [1024],
                         p + "ffns.0.layers.1.weight": [256, 1024], p + "ffns.0.layers.1.bias": [256]})
    keys[t + "reference_points.weight"], keys[t + "reference_points.bias"] = [2, 256], [2]
    for i in range(6):
        keys[f"bbox_head.cls_branches.{i}.weight"], keys[f"bbox_head.cls_branches.{i}.bias"] = [80, 256], [80]
        for j, n_out in ((0, 256), (2, 256), (4, 4)):  # Linear, ReLU, Linear, ReLU, Linear
            keys[f"bbox_head.reg_branches.{i}.{j}.weight"] = [n_out, 256]
            keys[f"bbox_head.reg_branches.{i}.{j}.bias"] = [n_out]
    keys["bbox_head.query_embedding.weight"] = [300, 512]
    return {
        "source": "deformable-detr (mmdetection 2.x layout)",
        "read_from": ["yingkaining/isda@de2c2f4 (mmdetection 2.17 fork): configs/isda/isda_r50_3x_coco.py load_from = "
                      "deformable_detr_r50_16x2_50e_coco_20210419_220030-a12b9512.pth; "
                      "mmdet/models/utils/transformer.py "
                      "(DeformableDetrTransformer: level_embeds, reference_points, query_pos/query split), "
                      "mmdet/models/dense_heads/deformable_detr_head.py (cls_branches, reg_branches, query_embedding)",
                      "mmcv 1.x cnn/bricks/transformer.py (BaseTransformerLayer: attentions, ffns, norms in operation "
                      "order; FFN layers.0.0 / layers.1; MultiheadAttention.attn), ConvModule (conv, gn; no bias "
                      "before a norm), mmdet ChannelMapper (convs, extra_convs)"],
        "facts": {
            "top_level": {"meta": "dict (CLASSES, mmdet_version, config)", "state_dict": "state dict",
                          "optimizer": "dict (absent from model-zoo files)"},
            "dtype": "float32; num_batches_tracked int64 scalars",
            "classes": "80 sigmoid logits, contiguous labels (COCO ids sorted)",
            "shared": "cls_branches.N / reg_branches.N: one module listed 6 times (identical tensors)"},
        "shared_groups": ["bbox_head.cls_branches.{i}.", "bbox_head.reg_branches.{i}."],
        "int64_suffix": "num_batches_tracked",
        "keys": keys}


if __name__ == "__main__":
    for name, manifest in (("istr_v1_r50", istr_v1()), ("deformable_detr_r50", deformable_detr()),
                           ("deformable_detr_r50_mmdet", deformable_detr_mmdet())):
        keys = manifest.pop("keys")
        manifest["keys"] = keys
        text = json.dumps(manifest, indent=0, separators=(",", ":"))
        (OUT / f"{name}.json").write_text(text + "\n")
        print(name, len(keys), "keys", len(text), "bytes")
