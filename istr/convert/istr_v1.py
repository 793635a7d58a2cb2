"""ISTR v1 (hujiecpp/ISTR @967c901, the paper's model) detectron2 checkpoints -> istr_r50/r101_fpn_pca60 models.

Source layout (read from the authors' projects/ISTR/istr/{inseg,head,MaskEncoding}.py and the vendored detectron2
backbone/resnet.py, fpn.py; a released file is {"model": state dict, optional "iteration", "optimizer",
"scheduler", "trainer"}):
- backbone.bottom_up.stem.conv1.{weight, norm.*}, backbone.bottom_up.res{2..5}.{b}.{conv1,conv2,conv3}.{weight,
  norm.*}, res{s}.0.shortcut.{weight, norm.*}: a torchvision-style ResNet (STRIDE_IN_1X1=False: the stride sits in
  the 3x3 conv, as in timm's resnet50/101), every BN a detectron2 FrozenBatchNorm2d with buffers weight, bias,
  running_mean, running_var (eps 1e-5). res4 has 6 blocks in R50 and 23 in R101: the depth is read from the keys.
- backbone.fpn_lateral{2..5}.{weight,bias} (1x1) and backbone.fpn_output{2..5}.{weight,bias} (3x3): detectron2's
  FPN, no norm, sum fusion, nearest x2 top-down = torchvision's FeaturePyramidNetwork on maps whose sizes halve
  exactly (the input is padded to a multiple of 32). P6 (max-pool) has no weights and ISTR never uses it.
- pos_embeddings.weight [K, d], init_proposal_boxes.weight [K, 4] (normalised cx, cy, w, h).
- head.head_series.{0..5}: self_attn (nn.MultiheadAttention), inst_interact.{dynamic_layer, norm1..3, out_layer},
  linear1/linear2 (FFN), norm1..3, cls_module/reg_module/mask_module.{0,1,3,4,6,7} (Linear no bias, LayerNorm) and
  class_logits / bboxes_delta / mask_logits.
- mask_encoding.{components [l, M^2], explained_variances [l], means [M^2]}: the PCA (nn.Parameters of the model,
  loaded from the components file at construction, so every checkpoint carries them).
The PCA components file (projects/ISTR/LME/coco_2017_train_class_agnosticTrue_whitenTrue_sigmoidTrue_60_siz28.npz,
written by LME/mask_generation.py with numpy.savez) holds components_c [1, l, M^2], mean_c [1, M^2],
explained_variance_c [1, l] and ratio_c [1, l] (explained-variance ratios: informative only, dropped).

Conventions, converted or checked:
- Pixels: the authors' configs (Base-ISTR.yaml) feed RGB in 0..255 with PIXEL_MEAN (123.675, 116.28, 103.53) and
  PIXEL_STD (58.395, 57.12, 57.375) (torchvision ImageNet weights, INPUT.FORMAT "RGB"). This library feeds RGB in
  [0, 1] and normalises with pixel_mean / pixel_std in those units, so they become mean / 255 and std / 255: the
  normalised tensor is the same. For a detectron2 checkpoint trained with FORMAT "BGR" (caffe style, e.g. mean
  (103.530, 116.280, 123.675), std (1, 1, 1)), pass input_format="BGR" and its mean/std: the first conv's input
  channels are flipped (BGR -> RGB) and mean/std reordered, so that conv's output is unchanged. A caffe (MSRA)
  ResNet with STRIDE_IN_1X1=True cannot be told apart by its keys and is not supported.
- FrozenBN: weight, bias, running_mean, running_var are copied into the timm ResNet's frozen BNs (same eps, 1e-5).
- Classes: NUM_CLASSES=80 sigmoid (focal) logits, no background class; label j is the j-th COCO category id in
  sorted order (detectron2's contiguous ids), the same as this library's CocoInstances. The model gets the 80 COCO
  categories {"id", "name"}.
- Boxes: the query boxes stay normalised (cx, cy, w, h); the stages' deltas use weights (2, 2, 1, 1) and the
  scale clamp log(1e5 / 16) in both codes.
- PCA: whitened, in logit space, decoded with a sigmoid: the codec buffers are the authors' components, means and
  explained variances unchanged. Encoding (training targets only) uses a fixed margin eps = 0.025 where the
  authors draw one in [0.01, 0.05] per pixel and call.
- Image feature: the authors average each FPN map over the whole padded batch; the converted model sets
  image_pool_padding=True so that evaluation (images batched with others of their padded size) matches theirs.
- NHEADS (8 attention heads) is not stored in the weights; the authors' value is assumed.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from istr.convert.common import (COCO_CATEGORIES, ConversionReport, as_target_dtype, fill_target,
                                 load_source_checkpoint, source_state_dict, top_level_dropped)
from istr.fileio import check_readable_file

__all__ = ["SOURCE", "convert_istr_v1", "convert_istr_v1_state", "read_pca_file", "detect_istr_v1", "D2_PIXEL_MEAN",
           "D2_PIXEL_STD"]

SOURCE = "istr-v1"
WHAT = "ISTR v1 detectron2 checkpoint"
D2_PIXEL_MEAN = (123.675, 116.280, 103.530)  # Base-ISTR.yaml, RGB order, 0..255 pixels
D2_PIXEL_STD = (58.395, 57.120, 57.375)
TOP_LEVEL = {"iteration": "training progress (iteration count)", "optimizer": "optimizer state (not transferred)",
             "scheduler": "lr scheduler state (not transferred)", "trainer": "detectron2 trainer state",
             "__author__": "file provenance tag", "matching_heuristics": "detectron2 loading hint"}
DEPTHS = {6: 50, 23: 101}  # blocks in res4 -> ResNet depth
BRANCHES = {"cls_module": ("class_branch", "class_logits"), "reg_module": ("box_branch", "bboxes_delta"),
            "mask_module": ("mask_branch", "mask_logits")}


# ---------------------------------------------------------------------------------------------------- layout
def detect_istr_v1(keys: Sequence[str], shapes: Mapping[str, tuple], path: str | Path) -> int:
    """The ResNet depth (50 or 101) of an ISTR v1 checkpoint's keys; ValueError naming the layout found otherwise."""
    keyset = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keyset)

    found = None
    if has("bbox_head.") or has("roi_head.") or has("neck."):
        found = "an mmdetection-format checkpoint (bbox_head.* / roi_head.* / neck.* keys)"
    elif has("backbone.0.body.") or has("transformer."):
        found = "a DETR / Deformable DETR checkpoint (backbone.0.body.*, transformer.*): use source='deformable-detr'"
    elif has("backbone.bottom_up.patch_embed") or has("backbone.bottom_up.layers."):
        found = "an ISTR v2 checkpoint with a Swin transformer backbone (backbone.bottom_up.patch_embed)"
    elif has("mask_E.") or has("mask_D.") or any(".ret_roi_layer_" in k for k in keyset):
        found = "an ISTR v2 checkpoint with the autoencoder ('SMT') mask codec (mask_E.* / mask_D.* / ret_roi_layer_*)"
    elif any((re.fullmatch(r"head\.head_series\.\d+\.mask_module\.0\.weight", k) and len(shapes[k]) == 4)
             or re.fullmatch(r"head\.head_series\.\d+\.mask_module\.\d+\.running_mean", k) for k in keyset):
        found = "an ISTR v2 checkpoint (RoI-conv mask head: head.head_series.N.mask_module.* convolutions + BN)"
    elif "init_proposal_features.weight" in keyset:
        found = "a Sparse R-CNN checkpoint (init_proposal_features; no mask branch)"
    elif has("roi_heads.") or has("proposal_generator."):
        found = "a detectron2 R-CNN checkpoint (roi_heads.* / proposal_generator.*)"
    elif not has("backbone.bottom_up.") or "pos_embeddings.weight" not in keyset \
            or "head.head_series.0.mask_logits.weight" not in keyset:
        found = f"keys such as {sorted(keyset)[:5]}"
    if found is not None:
        raise ValueError(f"{path} is not an {WHAT} (expected backbone.bottom_up.*, backbone.fpn_*, pos_embeddings, "
                         f"init_proposal_boxes, head.head_series.N.* with mask_logits): found {found}")
    res4 = {int(m.group(1)) for k in keyset if (m := re.match(r"backbone\.bottom_up\.res4\.(\d+)\.", k))}
    blocks = max(res4) + 1 if res4 else 0
    if blocks not in DEPTHS:
        raise ValueError(f"{path}: the ResNet has {blocks} blocks in res4; ISTR v1 checkpoints are R50 (6) or "
                         "R101 (23)")
    return DEPTHS[blocks]


def _resnet_key(rest: str) -> str | None:
    """detectron2 ResNet key (after backbone.bottom_up.) -> timm/torchvision ResNet key, or None if not ResNet."""
    if m := re.fullmatch(r"stem\.conv1\.weight", rest):
        return "conv1.weight"
    if m := re.fullmatch(r"stem\.conv1\.norm\.(weight|bias|running_mean|running_var)", rest):
        return f"bn1.{m.group(1)}"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.conv([123])\.weight", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.conv{m.group(3)}.weight"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.conv([123])\.norm\.(weight|bias|running_mean|running_var)", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.bn{m.group(3)}.{m.group(4)}"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.shortcut\.weight", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight"
    if m := re.fullmatch(r"res([2-5])\.(\d+)\.shortcut\.norm\.(weight|bias|running_mean|running_var)", rest):
        return f"layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{m.group(3)}"
    return None


def _head_key(rest: str, num_blocks: int = 3) -> str | None:
    """One stage's key (after head.head_series.N.) -> this library's ISTRStage key, or None."""
    direct = {"inst_interact.dynamic_layer": "interaction.generator", "inst_interact.out_layer": "interaction.out",
              "inst_interact.norm1": "interaction.norm1", "inst_interact.norm2": "interaction.norm2",
              "inst_interact.norm3": "interaction.norm3", "linear1": "ffn.0", "linear2": "ffn.2",
              "norm1": "norm1", "norm2": "norm2", "norm3": "norm3", "self_attn.out_proj": "self_attn.out_proj"}
    if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
        return rest
    module, _, param = rest.rpartition(".")
    if module in direct and param in ("weight", "bias"):
        return f"{direct[module]}.{param}"
    for src, (dst, last) in BRANCHES.items():
        if m := re.fullmatch(rf"{src}\.(\d+)\.(weight|bias)", rest):
            return f"{dst}.{m.group(1)}.{m.group(2)}"  # (Linear, LayerNorm, ELU) x 3: the same indices
        if module == last and param in ("weight", "bias"):
            return f"{dst}.{3 * num_blocks}.{param}"
    return None


CODEC_KEYS = {"mask_encoding.components": "codec.components", "mask_encoding.explained_variances":
              "codec.explained_variance", "mask_encoding.means": "codec.mean"}


def _target_key(key: str) -> str | None:
    if key.startswith("backbone.bottom_up."):
        new = _resnet_key(key[len("backbone.bottom_up."):])
        return None if new is None else f"backbone.body.{new}"
    if m := re.fullmatch(r"backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)", key):
        blocks = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
        return f"backbone.neck.{blocks}.{int(m.group(2)) - 2}.0.{m.group(3)}"
    if key == "pos_embeddings.weight":
        return "position_embeddings"
    if key == "init_proposal_boxes.weight":
        return "query_boxes"
    if m := re.fullmatch(r"head\.head_series\.(\d+)\.(.+)", key):
        new = _head_key(m.group(2))
        return None if new is None else f"stages.{m.group(1)}.{new}"
    return CODEC_KEYS.get(key)


# ---------------------------------------------------------------------------------------------------- PCA file
def read_pca_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The authors' PCA components file (numpy .npz: components_c [1, l, M^2], mean_c [1, M^2],
    explained_variance_c [1, l], ratio_c [1, l]) -> {"components" [l, M^2], "mean" [M^2], "explained_variance" [l],
    "ratio" [l]} float32. ValueError naming the file when it is not such a file."""
    path = check_readable_file(path, "PCA components file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path} is not a readable PCA components file (a numpy .npz as the authors' "
                         f"LME/mask_generation.py writes; truncated or corrupt?): {type(exc).__name__}: "
                         f"{exc}") from None
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError(f"{path} is not a PCA components .npz file (no arrays)")
    need = ("components_c", "mean_c", "explained_variance_c")
    missing = [k for k in need if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not the authors' PCA components file: it lacks {missing} (it holds "
                         f"{sorted(arrays)}; expected components_c, mean_c, ratio_c, explained_variance_c)")
    comp, mean, var = arrays["components_c"], arrays["mean_c"], arrays["explained_variance_c"]
    if comp.ndim != 3 or comp.shape[0] != 1:
        raise ValueError(f"{path}: components_c must be [1, l, M^2] (class-agnostic PCA), got {comp.shape}")
    l, p = comp.shape[1:]
    m = int(round(p ** 0.5))
    if m * m != p:
        raise ValueError(f"{path}: components_c has {p} features, not a square mask grid M^2")
    if mean.shape != (1, p) or var.shape != (1, l):
        raise ValueError(f"{path}: mean_c {mean.shape} / explained_variance_c {var.shape} do not fit components_c "
                         f"{comp.shape} (expected (1, {p}) and (1, {l}))")
    out = {"components": comp[0], "mean": mean[0], "explained_variance": var[0]}
    if "ratio_c" in arrays:
        if arrays["ratio_c"].shape != (1, l):
            raise ValueError(f"{path}: ratio_c {arrays['ratio_c'].shape} does not fit l={l}")
        out["ratio"] = arrays["ratio_c"][0]
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}
    if not all(torch.isfinite(t).all() for t in tensors.values()) or (tensors["explained_variance"] <= 0).any():
        raise ValueError(f"{path}: the PCA holds non-finite values or non-positive explained variances")
    return tensors


# ---------------------------------------------------------------------------------------------------- conversion
def _pixel_convention(input_format: str, pixel_mean: Sequence[float] | None,
                      pixel_std: Sequence[float] | None) -> tuple[bool, list[float], list[float], str]:
    """(flip first conv?, pixel_mean, pixel_std in RGB [0, 1] units, a sentence) from detectron2's settings."""
    fmt = str(input_format).upper()
    if fmt not in ("RGB", "BGR"):
        raise ValueError(f"input_format must be 'RGB' or 'BGR' (detectron2's INPUT.FORMAT), got {input_format!r}")
    mean = list(D2_PIXEL_MEAN if pixel_mean is None else pixel_mean)
    std = list(D2_PIXEL_STD if pixel_std is None else pixel_std)
    if fmt == "BGR" and pixel_mean is None:
        raise ValueError("input_format='BGR' needs the checkpoint's pixel_mean (and pixel_std) in BGR order, e.g. "
                         "detectron2's caffe defaults (103.530, 116.280, 123.675) and (1, 1, 1)")
    for name, v in (("pixel_mean", mean), ("pixel_std", std)):
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"{name} must be 3 numbers (detectron2 units: 0..255 pixels), got {v!r}")
    if min(std) <= 0:
        raise ValueError(f"pixel_std must be positive, got {std}")
    flip = fmt == "BGR"
    if flip:
        mean, std = mean[::-1], std[::-1]
    given_mean = list(D2_PIXEL_MEAN if pixel_mean is None else pixel_mean)
    given_std = list(D2_PIXEL_STD if pixel_std is None else pixel_std)
    sentence = (f"pixels: the checkpoint expects {fmt} 0..255 normalised with mean {given_mean} "
                f"std {given_std}; this model takes RGB [0, 1] with "
                f"pixel_mean = mean/255, pixel_std = std/255 (RGB order)"
                + ("; the first conv's input channels were flipped BGR -> RGB" if flip else ""))
    return flip, [round(x / 255.0, 10) for x in mean], [round(x / 255.0, 10) for x in std], sentence


def convert_istr_v1_state(src: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor], *,
                          path: str | Path = "<checkpoint>", pca: Mapping[str, torch.Tensor] | None = None,
                          flip_input_channels: bool = False, class_mismatch_ok: bool = False,
                          report: ConversionReport | None = None) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map an ISTR v1 `model` state dict onto the keys of `target_state` (an ISTR model's state_dict()).

    pca: the components file's tensors (read_pca_file) when the checkpoint lacks mask_encoding.* or to check them.
    class_mismatch_ok: a class head of another size is left to the model (listed as fresh) instead of an error.
    Returns (tensors for target keys, report); ValueError for any key it cannot account for.
    """
    report = report or ConversionReport(SOURCE, str(path), "ISTR")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in src.items():
        new = _target_key(key)
        if new is None:
            unknown.append(key)
            continue
        if key == "backbone.bottom_up.stem.conv1.weight" and flip_input_channels:
            value = value.flip(1)
        report.mapped[key] = new
        out[new] = value
    if unknown:
        raise ValueError(f"{path}: keys with no counterpart in this library's ISTR v1 model: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''} ({len(unknown)} in all)")
    codec = check_pca(src, pca, path, report)
    out.update({f"codec.{name}": value for name, value in codec.items()})
    out["codec.fitted"] = torch.tensor(True)
    fresh: dict[str, str] = {}
    for key in [k for k in out if re.fullmatch(r"stages\.\d+\.class_branch\.9\.(weight|bias)", k)]:
        if key in target_state and out[key].shape != target_state[key].shape and class_mismatch_ok:
            fresh[key] = (f"class head: the model has {target_state[key].shape[0]} classes, the checkpoint "
                          f"{out[key].shape[0]}; kept the model's initialisation (prior 0.01)")
            del out[key]
    fill_target(target_state, out, fresh, path, WHAT)
    converted = {k: as_target_dtype(v, target_state[k]) for k, v in out.items()}
    for src_key, dst in report.mapped.items():
        if dst in converted:
            report.filled[dst] = src_key
    report.filled.setdefault("codec.fitted", "set: the codec is fitted (the authors' PCA)")
    report.fresh.update(fresh)
    return converted, report


def check_pca(src: Mapping[str, torch.Tensor], pca: Mapping[str, torch.Tensor] | None, path: str | Path,
              report: ConversionReport | None = None) -> dict[str, torch.Tensor]:
    """The PCA the converted codec gets {"components", "mean", "explained_variance"}: the checkpoint's own
    mask_encoding.* (checked against the PCA file when given) or the file's. ValueError when there is none, when
    the file's size does not fit the mask head, or when file and checkpoint disagree."""
    in_ckpt = all(k in src for k in CODEC_KEYS)
    if not in_ckpt and any(k in src for k in CODEC_KEYS):
        raise ValueError(f"{path}: the checkpoint holds only some of {sorted(CODEC_KEYS)}")
    l_head = int(src["head.head_series.0.mask_logits.weight"].shape[0])
    names = {"mask_encoding.components": "components", "mask_encoding.means": "mean",
             "mask_encoding.explained_variances": "explained_variance"}
    if pca is not None:
        l, p = pca["components"].shape
        if p != 28 * 28:
            m = int(round(p ** 0.5))
            raise ValueError(f"the PCA components file works on {m}x{m} grids; ISTR v1 uses 28x28 (a PCA file of "
                             "another size; a 112x112 PCA belongs to ISTR v2)")
        if l != l_head:
            raise ValueError(f"the PCA components file has l={l} components but the checkpoint's mask head predicts "
                             f"{l_head}-d embeddings: use the file with {l_head} components (..._{l_head}_siz28.npz)")
        if in_ckpt:
            for src_key, name in names.items():
                a, b = src[src_key].float(), pca[name]
                if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                    diff = (a - b).abs().max().item() if a.shape == b.shape else \
                        f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
                    raise ValueError(f"the PCA components file does not match the PCA stored in {path} "
                                     f"({src_key} vs {name}: max difference {diff}); the head was trained with the "
                                     "checkpoint's own, so pass the file it was trained with, or none")
            if report is not None:
                report.notes.append("the PCA components file matches the PCA stored in the checkpoint")
        if "ratio" in pca and report is not None:
            report.dropped["<pca file: ratio_c>"] = (f"explained-variance ratios, informative only "
                                                     f"(sum {float(pca['ratio'].sum()):.4f})")
    elif not in_ckpt:
        raise ValueError(f"{path} stores no PCA (mask_encoding.*): pass the authors' components file, "
                         f"pca_path=.../coco_2017_train_class_agnosticTrue_whitenTrue_sigmoidTrue_{l_head}_siz28.npz")
    chosen = {name: src[k] for k, name in names.items()} if in_ckpt else \
        {name: pca[name] for name in ("components", "mean", "explained_variance")}
    if chosen["components"].shape != (l_head, 28 * 28) or chosen["mean"].shape != (28 * 28,) \
            or chosen["explained_variance"].shape != (l_head,):
        raise ValueError(f"{path}: the PCA has components {tuple(chosen['components'].shape)}, mean "
                         f"{tuple(chosen['mean'].shape)}, variances {tuple(chosen['explained_variance'].shape)}; "
                         f"ISTR v1 needs [{l_head}, 784], [784], [{l_head}] (28x28 grids, the head's {l_head} dims)")
    var = chosen["explained_variance"]
    if not torch.isfinite(var).all() or (var <= 0).any():
        raise ValueError(f"{path}: the PCA's explained variances must be positive and finite")
    if not in_ckpt and report is not None:
        for name in ("components", "mean", "explained_variance"):
            report.filled[f"codec.{name}"] = f"PCA file: {name}_c"
    return chosen


def convert_istr_v1(path: str | Path, *, pca_path: str | Path | None = None, model_name: str | None = None,
                    input_format: str = "RGB", pixel_mean: Sequence[float] | None = None,
                    pixel_std: Sequence[float] | None = None,
                    trust_pickle: bool = False) -> tuple[Any, ConversionReport]:
    """An ISTR v1 checkpoint (+ optional PCA file) -> (an istr_r50/r101_fpn_pca60 model in eval mode, report)."""
    import istr

    flip, mean, std, pixel_sentence = _pixel_convention(input_format, pixel_mean, pixel_std)
    ckpt = load_source_checkpoint(path, WHAT, trust_pickle)
    src, top = source_state_dict(ckpt, path, WHAT)
    depth = detect_istr_v1(list(src), {k: tuple(v.shape) for k, v in src.items()}, path)
    dropped = top_level_dropped(top, TOP_LEVEL, path, WHAT)
    expected = f"istr_r{depth}_fpn_pca60"
    if model_name is None:
        model_name = expected
    if model_name not in ("istr_r50_fpn_pca60", "istr_r101_fpn_pca60"):
        raise ValueError(f"model_name must be 'istr_r50_fpn_pca60' or 'istr_r101_fpn_pca60' for {SOURCE}, "
                         f"got {model_name!r}")
    if model_name != expected:
        raise ValueError(f"{path} holds a ResNet-{depth} (res4 blocks) but model_name={model_name!r}; use {expected!r}")
    pca = read_pca_file(pca_path) if pca_path is not None else None
    check_pca(src, pca, path)  # every PCA problem before the model is built
    # shapes the preset does not fix: read from the weights (the authors' values for the released files)
    l_head = int(src["head.head_series.0.mask_logits.weight"].shape[0])
    stages = 1 + max(int(m.group(1)) for k in src if (m := re.match(r"head\.head_series\.(\d+)\.", k)))
    num_classes = int(src["head.head_series.0.class_logits.weight"].shape[0])
    pos = src["pos_embeddings.weight"]
    codec = istr.create_codec("pca", mask_size=28, dim=l_head, whiten=True, logit_space=True)
    overrides = dict(num_queries=int(pos.shape[0]), hidden_dim=int(pos.shape[1]), num_stages=stages,
                     ffn_dim=int(src["head.head_series.0.linear1.weight"].shape[0]),
                     dynamic_dim=int(src["head.head_series.0.inst_interact.norm1.weight"].shape[0]),
                     image_pool_padding=True, pixel_mean=mean, pixel_std=std)
    model = istr.create_model(model_name, num_classes=num_classes, codec=codec, **overrides)
    report = ConversionReport(SOURCE, str(path), model_name, dropped=dict(dropped))
    converted, report = convert_istr_v1_state(src, model.state_dict(), path=path, pca=pca,
                                              flip_input_channels=flip, report=report)
    model.load_state_dict(converted)
    if num_classes == 80:
        model.categories = [dict(c) for c in COCO_CATEGORIES]
    else:
        report.notes.append(f"the checkpoint has {num_classes} classes, not COCO's 80: no category names attached "
                            "(set model.categories = [{'id', 'name'}, ...] in label order)")
    report.conventions += [
        pixel_sentence,
        "FrozenBN: detectron2 FrozenBatchNorm2d weight/bias/running_mean/running_var -> the timm ResNet's frozen BN "
        "(eps 1e-5 in both)",
        "classes: 80 sigmoid (focal) logits, no background class; label j = j-th COCO category id in sorted order",
        "boxes: query boxes normalised (cx, cy, w, h); stage deltas with weights (2, 2, 1, 1) as in the source",
        f"PCA: l={l_head} components of 28x28 grids, whitened, logit space (sigmoid on decode), unchanged",
        "image feature pooled over the padded batch as the authors (image_pool_padding=True)",
        "8 attention heads assumed (NHEADS is not stored in the weights)"]
    report.notes.append("fine-tuning: the authors crop GT masks by rasterising polygons into the box; this library's "
                        "default is an RoIAlign crop (target_crop='polygon' with CocoInstances(segmentations=True) "
                        "reproduces theirs)")
    return model.eval(), report
