"""Converters for the authors' checkpoints: ISTR v1 (detectron2) and Deformable DETR (ISDA's start) -> istr models.

convert(path, source) builds this library's model from a source checkpoint and returns (model, ConversionReport);
with out= it writes the model file (istr.save_model: config, weights, categories) atomically, and nothing when
anything fails. load_init(model, path) fills an existing model from a converted model file or a source checkpoint
(the `istr train --init FILE` path). cli_main(argv) is `istr convert`. The conventions each source needs (pixel
order and units, FrozenBN, class order, background, boxes, PCA whitening and logit space) are converted or checked
and documented in istr.convert.istr_v1 and istr.convert.deformable_detr; every conversion is strict: each source
key is mapped or listed as dropped, each target tensor is filled or listed as freshly initialised, or it fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from istr.convert.common import COCO_CATEGORIES, COCO_CATEGORY_IDS, ConversionReport, load_source_checkpoint
from istr.convert.deformable_detr import convert_deformable_detr, convert_deformable_detr_state
from istr.convert.istr_v1 import convert_istr_v1, convert_istr_v1_state, read_pca_file

__all__ = ["SOURCES", "COCO_CATEGORIES", "COCO_CATEGORY_IDS", "ConversionReport", "convert", "load_init",
           "detect_source", "cli_main", "read_pca_file"]

SOURCES = ("istr-v1", "deformable-detr")
_ALIASES = {"istr-v1": "istr-v1", "istr_v1": "istr-v1", "istrv1": "istr-v1", "deformable-detr": "deformable-detr",
            "deformable_detr": "deformable-detr", "deformabledetr": "deformable-detr"}


def _source_name(source: str) -> str:
    if not isinstance(source, str) or source.lower() not in _ALIASES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    return _ALIASES[source.lower()]


def detect_source(state_keys: Sequence[str]) -> str | None:
    """'istr-v1' for detectron2 ISTR keys (backbone.bottom_up.*), 'deformable-detr' for backbone.0.body.* with a
    transformer (or mmdetection's bbox_head.transformer.*), else None."""
    keys = list(state_keys)
    if any(k.startswith("backbone.bottom_up.") for k in keys):
        return "istr-v1"
    if any(k.startswith("backbone.0.body.") for k in keys) and any(k.startswith("transformer.") for k in keys):
        return "deformable-detr"
    if any(k.startswith("bbox_head.transformer.") for k in keys):  # mmdetection 2.x Deformable DETR
        return "deformable-detr"
    return None


def convert(source_path: str | Path, source: str, *, pca_path: str | Path | None = None,
            out: str | Path | None = None, model_name: str | None = None, num_classes: int = 80,
            input_format: str = "RGB", pixel_mean: Sequence[float] | None = None,
            pixel_std: Sequence[float] | None = None, trust_pickle: bool = False) -> tuple[nn.Module, ConversionReport]:
    """Convert one of the authors' checkpoints into this library's model -> (model in eval mode, report).

    source: "istr-v1" (a detectron2 ISTR v1 checkpoint -> istr_r50_fpn_pca60 / istr_r101_fpn_pca60, the depth
    read from the keys; pca_path: the authors' PCA components .npz, optional because the checkpoint stores its
    PCA, checked against it when given; input_format / pixel_mean / pixel_std: detectron2's INPUT.FORMAT and
    MODEL.PIXEL_MEAN/STD in 0..255 units, default the authors' RGB config) or "deformable-detr" (the official
    single-stage R50 checkpoint -> isda_r50 with the backbone, neck levels, transformer and queries filled, the rest
    freshly initialised; num_classes: 80 maps the COCO class head, another number initialises it afresh).
    out: write the model file there (atomically; nothing is written when the conversion fails).
    trust_pickle: unpickle objects a safe load refuses (only for files you trust).
    """
    source = _source_name(source)
    if out is not None and Path(out).is_dir():
        raise IsADirectoryError(f"out={out} is a directory; give the model file's path "
                                f"(e.g. {Path(out) / 'model.safetensors'})")
    if source == "istr-v1":
        if num_classes != 80:
            raise ValueError("num_classes is read from an ISTR v1 checkpoint; it applies to deformable-detr only")
        model, report = convert_istr_v1(source_path, pca_path=pca_path, model_name=model_name,
                                        input_format=input_format, pixel_mean=pixel_mean, pixel_std=pixel_std,
                                        trust_pickle=trust_pickle)
    else:
        if pca_path is not None:
            raise ValueError("pca_path belongs to istr-v1 conversions; a Deformable DETR checkpoint has no codec")
        if input_format.upper() != "RGB" or pixel_mean is not None or pixel_std is not None:
            raise ValueError("input_format/pixel_mean/pixel_std apply to istr-v1 (Deformable DETR is RGB with "
                             "ImageNet mean/std, the library's own convention)")
        model, report = convert_deformable_detr(source_path, model_name=model_name, num_classes=num_classes,
                                                trust_pickle=trust_pickle)
    if out is not None:
        import istr

        istr.save_model(model, out)
        report.notes.append(f"written to {out}")
    return model, report


def load_init(model: nn.Module, path: str | Path, source: str | None = None, *,
              pca_path: str | Path | None = None, trust_pickle: bool = False) -> ConversionReport:
    """Initialise `model` in place from `path`: a model file of this library (istr.save_model: tensors with the
    model's names and shapes are loaded) or a source checkpoint (converted on the fly; `source` detected from its
    keys when None). Class heads of another size keep the model's initialisation; any other tensor whose shape
    differs, or a file with nothing in common with the model, is a ValueError. Returns the report (filled, fresh,
    dropped); the model keeps its device and train/eval mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_init expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    target = model.state_dict()
    if path.is_dir() or path.suffix == ".safetensors":
        return _load_model_file(model, path, target)
    ckpt = load_source_checkpoint(path, "checkpoint", trust_pickle)
    weights = ckpt.get("model", ckpt.get("state_dict")) if isinstance(ckpt, dict) else None
    keys = list(weights) if isinstance(weights, dict) else []
    if source is None:
        source = detect_source(keys)
        if source is None:
            raise ValueError(f"{path}: cannot tell which source checkpoint this is (keys such as {sorted(keys)[:4]}); "
                             f"pass source= one of {list(SOURCES)}, or give a model file of this library")
    source = _source_name(source)
    from istr.convert import deformable_detr as dd, istr_v1 as v1
    from istr.convert.common import source_state_dict, top_level_dropped

    name = type(model).__name__
    if source == "istr-v1":
        src, top = source_state_dict(ckpt, path, v1.WHAT)
        v1.detect_istr_v1(list(src), {k: tuple(v.shape) for k, v in src.items()}, path)
        dropped = top_level_dropped(top, v1.TOP_LEVEL, path, v1.WHAT)
        pca = read_pca_file(pca_path) if pca_path is not None else None
        report = ConversionReport(source, str(path), name, dropped=dict(dropped))
        converted, report = convert_istr_v1_state(src, target, path=path, pca=pca, class_mismatch_ok=True,
                                                  report=report)
    else:
        if pca_path is not None:
            raise ValueError("pca_path belongs to istr-v1 checkpoints")
        src, top = source_state_dict(ckpt, path, dd.WHAT, entries=("model", "state_dict"))
        layout = dd.detect_deformable_detr(list(src), path, {k: tuple(v.shape) for k, v in src.items()})
        dropped = top_level_dropped(top, dd.TOP_LEVEL, path, dd.WHAT)
        dd.check_args(ckpt.get("args"), path)
        if layout == dd.MMDET:
            dd.check_meta(ckpt.get("meta"), path)
        report = ConversionReport(source, str(path), name, dropped=dict(dropped))
        converted, report = convert_deformable_detr_state(src, target, path=path, layout=layout, report=report)
    _load_into(model, target, converted)
    return report


def _load_model_file(model: nn.Module, path: Path, target: dict[str, torch.Tensor]) -> ConversionReport:
    from istr.io import find_model_file, read_safetensors

    path = find_model_file(path)
    meta, tensors = read_safetensors(path, "model")
    origin = meta.get("architecture", meta.get("format", "model file"))
    report = ConversionReport(origin, str(path), type(model).__name__)
    mine = getattr(type(model), "architecture", None)
    if "architecture" in meta and mine is not None and meta["architecture"] != mine:
        report.notes.append(f"the file holds a {meta['architecture']!r} model and the model is {mine!r}: only the "
                            "tensors with the same names and shapes (typically the backbone trunk) were loaded")
    converted, bad = {}, []
    for key, value in tensors.items():
        if key not in target:
            report.dropped[key] = "not in the model"
        elif value.shape != target[key].shape:
            if key.endswith(("class_branch.9.weight", "class_branch.9.bias")) or key.startswith("class_embed."):
                report.dropped[key] = f"class head of {value.shape[0]} classes; the model has {target[key].shape[0]}"
                report.fresh[key] = "class head kept as initialised (another number of classes)"
            else:
                bad.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            converted[key] = value.to(target[key].dtype)
            report.mapped[key] = key
            report.filled[key] = key
    if bad:
        raise ValueError(f"{path} does not fit the model ({type(model).__name__}): shape mismatches {bad[:8]}")
    if not converted:
        raise ValueError(f"{path} has no tensor in common with the model ({type(model).__name__}): "
                         "a file of another model")
    for key in target:
        if key not in converted:
            report.fresh.setdefault(key, "not in the file: kept as initialised")
    _load_into(model, target, converted)
    return report


def _load_into(model: nn.Module, target: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> None:
    state = dict(target)
    state.update({k: v.to(device=target[k].device) for k, v in converted.items()})
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `istr convert` arguments on a parser (istr.cli adds them to its sub-command)."""
    p.add_argument("source_file", metavar="SOURCE", help="the authors' checkpoint (.pth)")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the checkpoint's origin")
    p.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    p.add_argument("--pca", metavar="FILE", help="istr-v1: the PCA components .npz (optional; checked against the "
                   "checkpoint's stored PCA)")
    p.add_argument("--model", dest="model_name", help="target preset (default: from the checkpoint)")
    p.add_argument("--num-classes", type=int, default=80, help="deformable-detr: the model's classes (80 maps COCO's "
                   "head; another number initialises the class head afresh)")
    p.add_argument("--input-format", default="RGB", choices=("RGB", "BGR"), help="istr-v1: detectron2 INPUT.FORMAT "
                   "the checkpoint was trained with (the authors: RGB)")
    p.add_argument("--pixel-mean", type=float, nargs=3, help="istr-v1: MODEL.PIXEL_MEAN (0..255, input order)")
    p.add_argument("--pixel-std", type=float, nargs=3, help="istr-v1: MODEL.PIXEL_STD (0..255, input order)")
    p.add_argument("--trust-pickle", action="store_true", help="unpickle objects a safe load refuses (trusted files)")
    p.add_argument("--report", metavar="JSON", help="also write the full key-by-key report as JSON")
    return p


DESCRIPTION = ("Convert the authors' checkpoints into an istr model file: ISTR v1 (detectron2, + its PCA file) or "
               "Deformable DETR (-> isda_r50's start). Prints what was mapped, dropped and freshly initialised.")


def build_parser(prog: str = "istr convert") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def cmd_convert(args: argparse.Namespace) -> int:
    """Run a parsed `istr convert`; 0 when the model file was written, 2 (one line on stderr) for bad input."""
    try:
        if Path(args.out).is_dir():
            raise IsADirectoryError(f"--out {args.out} is a directory; give the model file's path")
        model, report = convert(args.source_file, args.source, pca_path=args.pca, model_name=args.model_name,
                                num_classes=args.num_classes, input_format=args.input_format,
                                pixel_mean=args.pixel_mean, pixel_std=args.pixel_std, trust_pickle=args.trust_pickle)
        if args.report:
            from istr.fileio import atomic_write_bytes

            atomic_write_bytes(args.report, json.dumps(report.as_dict(), indent=1).encode())
        import istr

        istr.save_model(model, args.out)  # last: no model file unless everything before it worked
        report.notes.append(f"written to {args.out}")
    except (ValueError, TypeError, KeyError, OSError) as exc:
        print(f"istr convert: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`istr convert SOURCE --from istr-v1|deformable-detr [--pca FILE] --out model.safetensors` -> exit status
    (0 done, 2 bad input with one line on stderr)."""
    return cmd_convert(build_parser().parse_args(argv))
