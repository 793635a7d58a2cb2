"""`istr` command line: fit-codec, train, eval, predict and demo, thin wrappers over the Python API.

`istr train`'s training options are generated from istr.engine.TrainConfig's fields (name, type, default and help
in one place); every number a command takes is checked by istr.checks.check_number, as the API checks it.
Bad input (arguments, files, data) ends a command with one line `istr <command>: error: ...` and status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Subset

import istr
from istr.checks import check_device, check_number
from istr.codecs import CODECS, create_codec, load_codec
from istr.data import CocoInstances, build_transforms, load_image
from istr.data.coco import describe_stats
from istr.engine.config import TrainConfig
from istr.engine.distributed import cleanup_distributed
from istr.engine.evaluate import evaluate
from istr.engine.fit_codec import coco_mask_grids
from istr.engine.predict import predict
from istr.engine.rundir import RunDir, RunLockedError, write_error
from istr.engine.train_loop import Trainer
from istr.fileio import atomic_write_bytes, check_readable_file, read_json
from istr.io import CorruptFileError, MODEL_FILE, load_model
from istr.models import create_model, default_model, list_models, preset_info
from istr.viz import draw_instances, save_image

__all__ = ["main", "build_parser", "resolve_model_path", "parse_key_values"]

logger = logging.getLogger("istr")


# ---------------------------------------------------------------------------------------------------- helpers
def parse_key_values(items: Sequence[str] | None, what: str = "argument") -> dict[str, Any]:
    """["k=v", ...] -> {k: v}; values are parsed as JSON when they can be (numbers, true/false, lists), else str."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_model_path(path: str | Path) -> Path:
    """A model file, a checkpoint dir (holding model.safetensors) or a training run dir -> the model file.

    FileNotFoundError when there is none, PermissionError when it exists but cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).find_model()
    return check_readable_file(path, "model file")


def _error_text(exc: BaseException) -> str:
    """One line for an exception: KeyError without its repr quotes; an error raised in a DataLoader worker as its
    original message (not the worker's folded traceback); newlines folded."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if "Original Traceback" in text:  # torch re-raises worker errors as "Caught X in DataLoader worker ..."
        prefix = f"{type(exc).__name__}: "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        if lines:
            text = lines[-1][len(prefix):]
    text = " ".join(text.split())
    return text or type(exc).__name__


def _is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` must be a folder we may write in (path itself is created later)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, so no folder can be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def _check_out_dir(path: str | Path, flag: str, overwrite: bool, resume_hint: bool = False) -> Path:
    """An output directory: not an existing file, not written by a live run; an existing non-empty one only with
    --overwrite (or --resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is an existing file; expected a directory (new, empty, or "
                              "with --overwrite one whose files may be replaced)")
    RunDir(path).check_not_locked()
    if _is_non_empty_dir(path) and not overwrite:
        also = "continue its training with --resume, or " if resume_hint else ""
        raise FileExistsError(f"{flag} {path} is an existing non-empty directory; {also}pass --overwrite to replace "
                              "its files, or choose a new directory")
    _check_writable_parent(path / "x", flag)
    return path


def _check_out_file(path: str | Path | None, flag: str, overwrite: bool) -> Path | None:
    """An output file: not a directory; an existing file only with --overwrite; its folder writable."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is an existing directory; expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it, or choose a new file")
    _check_writable_parent(path, flag)
    return path


def _build(what: str, flag: str, factory, *args: Any, **kwargs: Any):
    """factory(*args, **kwargs) with user-given keywords: a TypeError (an unknown keyword, a value of the wrong
    type) becomes a ValueError naming `flag`."""
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{flag} does not fit {what}: {_error_text(exc)}") from exc


def _check_registered(registry, name: str, flag: str) -> None:
    try:
        registry.get(name)
    except KeyError as exc:
        raise ValueError(f"{flag}: {_error_text(exc)}") from None


def _check_model_name(name: str, flag: str = "--model") -> None:
    try:
        preset_info(name)
    except KeyError as exc:
        raise ValueError(f"{flag}: {_error_text(exc)}") from None


def _dataset(images: str, ann: str, train: bool = False, augment: str = "none", aug_scale: float = 1.0,
             segmentations: bool = False) -> CocoInstances:
    transforms = None
    if train and augment != "none":
        transforms = build_transforms(True, scale=aug_scale, crop_prob=0.5 if augment == "paper" else 0.0)
    return CocoInstances(images, ann, transforms=transforms, include_empty=not train, segmentations=segmentations)


def _data_paths(args: argparse.Namespace, split: str) -> tuple[str, str] | None:
    """(image dir, annotation file) for split "train"/"val" from --synthetic ROOT or --{split}-images/--{split}-ann."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    if getattr(args, "synthetic", None):
        root = Path(args.synthetic)
        images = images or str(root / split)
        ann = ann or str(root / "annotations" / f"instances_{split}.json")
    if (images is None) != (ann is None):
        raise ValueError(f"give both --{split}-images and --{split}-ann (or --synthetic ROOT)")
    return (images, ann) if images else None


def _pct(value: float) -> str:
    """A COCO metric (a fraction; -1 where COCOeval has no ground truth) as a percentage with one decimal."""
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def _print_metrics(metrics: dict[str, Any]) -> None:
    """COCO metrics in % with one decimal ("mask: AP 37.1  AP50 ..."); with "stages", one line per stage first."""
    stages = metrics.get("stages") or []
    for i, stage in enumerate(stages, 1):
        parts = [f"{'mask' if kind == 'segm' else 'box'} " + "  ".join(
            f"{k} {_pct(stage[kind][k])}" for k in ("AP", "AP50", "AP75") if k in stage[kind])
            for kind in ("segm", "bbox") if isinstance(stage.get(kind), dict)]  # fmt: skip
        print(f"stage {i}/{len(stages)}: " + "  |  ".join(parts))
    for kind in ("segm", "bbox"):
        if isinstance(metrics.get(kind), dict):
            row = "  ".join(f"{k} {_pct(v)}" for k, v in metrics[kind].items() if isinstance(v, float))
            print(f"{'mask' if kind == 'segm' else 'box '}: {row}  (%)")


# ---------------------------------------------------------------------------------------------------- numbers
def _number_arg(p: argparse.ArgumentParser, flag: str, *, integer: bool = False, default: Any = None,
                help: str | None = None, **bounds: Any) -> None:
    """An int/float option whose value is checked after parsing by istr.checks.check_number (finite, in range);
    the bounds are kept with the parser's defaults, so main() checks every command's numbers the same way."""
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, type=int if integer else float, default=default, help=help)
    checks = dict(p.get_default("_number_checks") or {})
    checks[dest] = (flag, dict(integer=integer, allow_none=default is None, **bounds))
    p.set_defaults(_number_checks=checks)


def _check_numbers(args: argparse.Namespace) -> None:
    for dest, (flag, kwargs) in (getattr(args, "_number_checks", None) or {}).items():
        setattr(args, dest, check_number(flag, getattr(args, dest), **kwargs))


# ---------------------------------------------------------------------------------------------------- TrainConfig flags
def _config_fields() -> list[tuple[dataclasses.Field, str, Any]]:
    """(field, flag, type hint) of every TrainConfig field the command line offers (metadata cli != False)."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True) is False:
            continue
        out.append((f, f.metadata.get("flag", "--" + f.name.replace("_", "-")), hints[f.name]))
    return out


def _plain_type(hint: Any) -> Any:
    """int / float / str / bool / tuple[...] of an annotation, without its `| None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) and args:
        return _plain_type(args[0])
    return hint


def add_config_args(group: argparse._ArgumentGroup) -> None:
    """One option per TrainConfig field, from its name (or metadata "flag"), type, default and metadata "help"."""
    for f, flag, hint in _config_fields():
        kind = _plain_type(hint)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or "default" in f.metadata["help"] else f" (default {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=f.metadata["help"] + shown)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple:
            item, *rest = typing.get_args(kind)
            nargs = "*" if rest == [Ellipsis] else len(typing.get_args(kind))
            group.add_argument(flag, type=item, nargs=nargs, metavar=item.__name__.upper(), **kwargs)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **kwargs)
        else:  # pragma: no cover - a new field of another type must say cli=False or get a parser here
            raise TypeError(f"TrainConfig.{f.name}: no command-line form for {hint}; set metadata cli=False")


def config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The TrainConfig of the given options (others keep TrainConfig's defaults); errors name the flag. A time
    budget (--minutes) without --max-iters removes the step limit."""
    values = {f.name: getattr(args, f.name) for f, _, _ in _config_fields() if getattr(args, f.name) is not None}
    if values.get("max_minutes") is not None and "max_iters" not in values:
        values["max_iters"] = None
    try:
        return TrainConfig(**values, **extra)
    except (TypeError, ValueError) as exc:
        flags = {f.name: flag for f, flag, _ in _config_fields()}
        name, _, rest = str(exc).partition(" ")
        if name in flags:
            raise ValueError(f"{flags[name]} {rest}") from None
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------- commands
# the paper's codec (ISTR v1: whitened PCA of mask logits): `istr fit-codec`'s default for --codec pca
PCA_DEFAULTS: dict[str, Any] = {"whiten": True, "logit_space": True}


def _read_grids(ann_files: Sequence[str], mask_size: int, **kwargs: Any):
    """(grids [N, M, M] of all files, summed reader stats) through istr.engine.fit_codec.coco_mask_grids."""
    grids, total = [], {}
    for ann in ann_files:
        g, stats = coco_mask_grids(ann, mask_size, return_stats=True, **kwargs)
        grids.append(g)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    return torch.cat(grids), total


def _save_codec(codec, out: Path, masks: int) -> None:
    """codec.save(out); a failed write (a full disk) leaves no file and says which path and how much space."""
    try:
        codec.save(out)
    except Exception as exc:
        needed = sum(t.numel() * t.element_size() for t in codec.state_dict().values())
        failure = write_error(out, needed, exc)
        if failure is None:
            raise
        raise failure from None


def cmd_fit_codec(args: argparse.Namespace) -> int:
    _check_registered(CODECS, args.codec, "--codec")
    codec_args = parse_key_values(args.codec_arg, "--codec-arg")
    fit_args = parse_key_values(args.fit_arg, "--fit-arg")
    if args.codec == "pca":
        codec_args = {**PCA_DEFAULTS, **codec_args}
    out = _check_out_file(args.out, "--out", args.overwrite)
    for ann in [*args.ann, *(args.val_ann or [])]:
        check_readable_file(ann, "annotation json")
    codec = _build(f"the {args.codec} codec", "--codec-arg", create_codec, args.codec, mask_size=args.mask_size,
                   dim=args.dim, **codec_args)
    grids, stats = _read_grids(args.ann, codec.mask_size, max_masks=args.max_masks, seed=args.seed, crop=args.crop)
    settings = ", ".join(f"{k}={v}" for k, v in codec.config().items())
    print(f"fitting {args.codec} ({settings}) on {len(grids)} masks from {len(args.ann)} file(s) "
          f"({describe_stats(stats)})")
    _build(f"{type(codec).__name__}.fit()", "--fit-arg", codec.fit, grids, **fit_args)
    _save_codec(codec, out, len(grids))
    report = {"codec": args.codec, "config": codec.config(), "fit_masks": len(grids), "fit_stats": stats,
              "out": str(out), "fit_mean_iou": codec.reconstruction_iou(grids)}
    if args.val_ann:
        val_grids, report["val_stats"] = _read_grids(args.val_ann, codec.mask_size)
        report["val_mean_iou"] = codec.reconstruction_iou(val_grids)
    print(json.dumps(report, indent=2))
    return 0


def _resume(trainer: Trainer, path: Path) -> None:
    """trainer.resume(path), with a truncated or corrupt checkpoint reported as a ValueError naming it."""
    try:
        trainer.resume(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, CorruptFileError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, RunLockedError)):
            raise
        raise ValueError(f"cannot resume from {path}: the checkpoint is truncated or corrupt ({_error_text(exc)}); "
                         "resume from an earlier one (--resume OUT/checkpoints/iter_...) or start again with "
                         "--overwrite") from exc


def _check_same_codec(codec, checkpoint: Path, flag: str) -> None:
    """Refuse --codec on --resume when it is not the codec the checkpoint's model holds (it would be replaced by the
    checkpoint's without a word)."""
    mine = {f"codec.{k}": v for k, v in codec.state_dict().items()}
    try:
        with safe_open(str(checkpoint / MODEL_FILE), framework="pt") as f:
            keys = set(f.keys())
            if not set(mine) <= keys:
                return
            same = all(torch.equal(f.get_tensor(k), v.cpu()) for k, v in mine.items())
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by the resume itself
        return
    if not same:
        raise ValueError(f"{flag} is not the codec of the run being resumed ({checkpoint} holds another fitted "
                         "codec): resume without --codec (the checkpoint keeps its own), or start a new run")


def cmd_train(args: argparse.Namespace) -> int:
    # every check that needs no data comes first
    _check_model_name(args.model)
    model_args = parse_key_values(args.model_arg, "--model-arg")
    cfg = config_from_args(args)
    out = Path(args.out)
    run = RunDir(out)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again; pass one of them")
    run.check_not_locked()
    resume = run.find_checkpoint(args.resume) if args.resume else None
    _check_out_dir(out, "--out", overwrite=args.overwrite or bool(args.resume), resume_hint=True)
    if args.codec:
        check_readable_file(args.codec, "codec file")
    train_paths = _data_paths(args, "train")
    if train_paths is None:
        raise ValueError("no training data: give --train-images and --train-ann, or --synthetic ROOT")
    val_paths = _data_paths(args, "val")

    train_set = _dataset(*train_paths, train=True, augment=args.augment, aug_scale=args.aug_scale,
                         segmentations=model_args.get("target_crop") == "polygon")
    val_set = _dataset(*val_paths) if val_paths and not args.no_eval else None
    codec = load_codec(args.codec) if args.codec else None
    if codec is not None and resume is not None:
        _check_same_codec(codec, resume, "--codec")
    torch.manual_seed(cfg.seed)
    model = _build(f"the {args.model} preset", "--model-arg", create_model, args.model,
                   num_classes=train_set.num_classes, **({"codec": codec} if codec is not None else {}), **model_args)
    prepare = getattr(model, "prepare_training", None)
    if resume is None and callable(prepare):  # data-dependent preparation, e.g. fitting an unfitted codec
        note = prepare(train_paths[1], max_masks=args.codec_max_masks)
        if note:
            print(note)
    # overwrite: the Trainer deletes the previous run's files in OUT (after everything above was checked)
    trainer = Trainer(model, train_set, cfg, val_dataset=val_set, out_dir=out, overwrite=args.overwrite)
    if resume is not None:
        _resume(trainer, resume)
    result = trainer.train()
    if trainer.is_main and val_paths and val_set is None:  # --no-eval: `istr eval OUT` still finds its data
        run.update_record(val_images=str(Path(val_paths[0]).resolve()), val_ann=str(Path(val_paths[1]).resolve()))
    if trainer.is_main:
        evaluated = f"; evaluation {result.eval_s:.1f}s" if result.eval_s else ""
        print(f"trained {result.iterations} iterations in {result.elapsed_s:.1f}s of training "
              f"({result.stop_reason}){evaluated}; model: {result.model_path}")
        if result.metrics:
            _print_metrics(result.metrics)
    cleanup_distributed()  # under torchrun: every rank leaves the process group together, before exit
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    paths = _data_paths(args, "val")
    if paths is None and Path(args.model).is_dir():
        run = RunDir(args.model)
        paths = run.val_data()
        if paths is not None:
            print(f"evaluating on the validation data recorded in {run.record_file}: {paths[1]}")
    if paths is None:
        raise ValueError("no evaluation data: give --images and --ann, or --synthetic ROOT (a run directory "
                         "written by istr train with validation data, or by istr demo, remembers its own)")
    out = _check_out_file(args.out, "--out", args.overwrite)
    results = _check_out_file(args.results, "--results", args.overwrite)
    if out is not None and results is not None and out.resolve() == results.resolve():
        raise ValueError(f"--out and --results are the same file ({out}); give two paths")
    model_path = resolve_model_path(args.model)
    dataset = _dataset(*paths)
    model = load_model(model_path, map_location=args.device)
    if args.detections is not None:
        model.detections_per_image = args.detections
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model, dataset, batch_size=args.batch_size, all_stages=args.all_stages,
                       results_path=results, progress=not args.no_progress)
    _print_metrics(metrics)
    if out is not None:
        atomic_write_bytes(out, json.dumps(metrics, indent=2).encode())
        print(f"metrics written to {out}")
    return 0


def _category_names(ann: str | Path) -> list[str]:
    """Names by contiguous label (categories sorted by id) from the "categories" of a COCO json."""
    path = Path(ann)
    data = read_json(path, "annotation json (--ann)")
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and "id" in c and "name" in c
                                                          for c in cats):
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"--ann {path}: expected a COCO json with a non-empty \"categories\" list of "
                         f"{{\"id\", \"name\"}} objects, got {keys}")
    return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]


def cmd_predict(args: argparse.Namespace) -> int:
    out = _check_out_dir(args.out, "--out", args.overwrite)
    for path in args.images:
        check_readable_file(path, "image file")
    names = _category_names(args.ann) if args.ann else None
    model = load_model(resolve_model_path(args.model), map_location=args.device)
    if names is None and getattr(model, "categories", None):  # the training set's categories, saved with the model
        names = [str(c.get("name", i)) for i, c in enumerate(model.categories)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").unlink(missing_ok=True)  # a failure below must not leave an earlier run's results
    records = []
    for path in args.images:
        image = load_image(path)
        result = predict(model, image, score_threshold=args.score_threshold)
        overlay = out / (Path(path).stem + "_pred.png")
        save_image(draw_instances(image, result, class_names=names, score_threshold=args.score_threshold), overlay)
        records.append({"image": str(path), "overlay": str(overlay), "boxes": result["boxes"].tolist(),
                        "labels": result["labels"].tolist(), "scores": [round(s, 4) for s in result["scores"].tolist()],
                        "names": [names[i] if names and i < len(names) else str(i) for i in result["labels"].tolist()]})
        print(f"{path}: {len(result['scores'])} instances -> {overlay}")
    atomic_write_bytes(out / "predictions.json", json.dumps(records, indent=2).encode())
    return 0


# what `istr demo` writes besides its cached data/ (removed by --overwrite before a new run)
DEMO_OUTPUTS = ("train", "overlays", "report.md", "metrics.json", "loss_curve.png", "codec.safetensors",
                MODEL_FILE, "run.json")


def cmd_demo(args: argparse.Namespace) -> int:
    from istr.demo import run_demo  # the demo's recipe library: imported only by the command that runs it

    out = _check_out_dir(args.out, "--out", args.overwrite)
    if args.backbone_checkpoint is not None:
        check_readable_file(args.backbone_checkpoint, "backbone checkpoint")
    if args.pretrained:
        from istr.hub import check_pretrained_available

        backbone = preset_info(args.model).defaults.get("backbone")
        if isinstance(backbone, str):
            check_pretrained_available(backbone)  # the demo's backbone; fails in seconds without a network
    if args.overwrite:
        RunDir(out).clear(DEMO_OUTPUTS)
    given = {k: getattr(args, k) for k in ("iters", "minutes", "seed", "num_train", "num_val", "image_size", "lr",
                                           "batch_size", "eval_every") if getattr(args, k) is not None}
    report = run_demo(out, data=args.data, model=args.model, threads=args.threads, device=args.device,
                      pretrained=args.pretrained, backbone_checkpoint=args.backbone_checkpoint,
                      progress=not args.no_progress, **given)
    m = report["metrics"]
    print(f"demo written to {out}: mask AP {_pct(m['segm']['AP'])}, box AP {_pct(m['bbox']['AP'])} (%) after "
          f"{report['iterations']} iterations ({report['train_seconds']:.0f}s of training, "
          f"{report['seconds_per_iter']:.2f}s per iteration, {report['eval_seconds']:.0f}s of evaluation); "
          f"see {out / 'report.md'}. Next: istr predict {out} IMAGE...  |  istr eval {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def _add_data_args(p: argparse.ArgumentParser, splits: Sequence[str]) -> None:
    p.add_argument("--synthetic", metavar="ROOT", help="a dataset written by istr.data.make_synthetic_coco "
                   "(ROOT/{train,val} + ROOT/annotations/instances_{train,val}.json)")
    for split in splits:
        p.add_argument(f"--{split}-images", metavar="DIR", help=f"{split} image directory (COCO format)")
        p.add_argument(f"--{split}-ann", metavar="JSON", help=f"{split} COCO instances json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="istr", description="Instance segmentation with transformers (every "
                                     "registered model family): fit codecs, train, evaluate, predict, and run the "
                                     "CPU demo.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default = default_model()

    p = sub.add_parser("fit-codec", help="fit a mask codec on the GT masks of COCO json files",
                       description="Fit a mask codec (pca, dct, identity, autoencoder, ...) on the box-cropped GT "
                       "masks of one or more COCO instances files (no images needed) and save it.")
    p.add_argument("--ann", nargs="+", required=True, metavar="JSON", help="COCO instances json(s) to fit on")
    p.add_argument("--codec", default="pca", help="registered codec name (default: pca, built as ISTR v1's whitened "
                   "logit-space PCA: whiten=true logit_space=true unless --codec-arg says otherwise)")
    _number_arg(p, "--mask-size", integer=True, default=28, min=1, help="M, side of the mask grids (default 28)")
    _number_arg(p, "--dim", integer=True, default=60, min=1, help="l, embedding length (default 60)")
    p.add_argument("--codec-arg", nargs="*", metavar="K=V", help="extra codec constructor args, e.g. whiten=true")
    p.add_argument("--fit-arg", nargs="*", metavar="K=V", help="extra fit() args, e.g. epochs=20 (autoencoder)")
    _number_arg(p, "--max-masks", integer=True, min=1, help="fit on a random subset of this many masks")
    p.add_argument("--crop", choices=("roi_align", "polygon"), default="roi_align",
                   help="how masks are cropped into grids: soft RoIAlign crops (default, as ISTR's targets) or the "
                   "authors' binary polygon rasterisation (pair with --model-arg target_crop=polygon)")
    p.add_argument("--val-ann", nargs="*", metavar="JSON", help="also report reconstruction IoU on these masks")
    _number_arg(p, "--seed", integer=True, default=0, min=0, help="seed of the --max-masks subset (default 0)")
    p.add_argument("--out", required=True, help="codec file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_fit_codec)

    p = sub.add_parser("train", help="train a model (single process, or multi-GPU/multi-node under torchrun)",
                       description="Train a model preset on COCO-format data. The model prepares itself on the "
                       "training annotations first (model.prepare_training: e.g. ISTR fits its codec unless --codec "
                       "gives a fitted one). Writes OUT/log.jsonl, OUT/checkpoints/, OUT/model.safetensors, "
                       "OUT/run.json; one process at a time writes OUT. An error that ends training (an image that "
                       "cannot be decoded, a full disk, ...) first checkpoints the last finished step: fix the cause and "
                       "--resume. Multi-GPU: torchrun --nproc_per_node N -m istr train ...")
    _add_data_args(p, ("train", "val"))
    p.add_argument("--model", default=default, help=f"model preset (istr.list_models()); default {default}")
    p.add_argument("--model-arg", nargs="*", metavar="K=V", help="preset overrides, e.g. num_queries=20 min_size=128")
    p.add_argument("--codec", metavar="PATH", help="a fitted codec file (istr fit-codec), for models with a codec")
    _number_arg(p, "--codec-max-masks", integer=True, min=1, help="masks used by prepare_training to fit the "
                "codec (default all)")
    p.add_argument("--augment", choices=("none", "flip", "paper"), default="flip",
                   help="training augmentation: none, h-flip, or the paper's flip + random resize-crop")
    _number_arg(p, "--aug-scale", default=1.0, min=0, min_inclusive=False,
                help="scale of the paper's crop sizes (e.g. 0.25)")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT (a checkpoint or run directory), or (no value) from OUT's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="train afresh in an existing non-empty --out: its "
                   "previous checkpoints/, log.jsonl, model, run.json and results are removed (after every input "
                   "was checked)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation even if validation data is given")
    add_config_args(p.add_argument_group("training config (istr.engine.TrainConfig; unset recipe values come from "
                                         "the preset's recipe, else the library defaults, the paper's)"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO box/mask AP of a trained model on a COCO-format dataset",
                       description="Evaluate a model (a .safetensors file, a checkpoint dir or a run dir) with "
                       "pycocotools COCOeval (bbox and segm).")
    p.add_argument("model", help="model file, checkpoint directory or training run directory")
    p.add_argument("--images", dest="val_images", metavar="DIR", help="image directory")
    p.add_argument("--ann", dest="val_ann", metavar="JSON", help="COCO instances json")
    p.add_argument("--synthetic", metavar="ROOT", help="evaluate on ROOT's val split (make_synthetic_coco)")
    _number_arg(p, "--max-images", integer=True, min=1, help="evaluate the first N images only")
    _number_arg(p, "--batch-size", integer=True, default=1, min=1, help="images per forward (default 1)")
    _number_arg(p, "--detections", integer=True, min=1, help="override detections per image")
    p.add_argument("--all-stages", action="store_true", help="also score (and print) every refinement stage")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", metavar="JSON", help="write the COCO results json here")
    p.add_argument("--out", metavar="JSON", help="write the metrics here")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --results if they exist")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="run a model on image files and save overlays",
                       description="Predict instances on image files; writes OUT/<name>_pred.png overlays and "
                       "OUT/predictions.json (boxes, labels, scores).")
    p.add_argument("model", help="model file, checkpoint directory or training run directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="runs/predict", help="output directory (default runs/predict)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out (replacing "
                   "overlays of the same names and predictions.json)")
    _number_arg(p, "--score-threshold", default=0.4, min=0, max=1,
                help="drop detections below this, in [0, 1] (default 0.4)")
    p.add_argument("--ann", metavar="JSON", help="COCO json whose categories name the labels (default: the "
                   "categories saved with the model, if any)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    demo_models = list_models(demo=True)
    p = sub.add_parser("demo", help=f"synthetic data -> train a small preset ({default}) on CPU -> eval -> report",
                       description="The demo: generate the synthetic shapes dataset, prepare the model on its "
                       "training masks (a PCA codec for ISTR), train a small preset for a fixed number of steps, "
                       "evaluate, and write OUT/report.md, metrics.json, loss_curve.png, prediction overlays and "
                       "OUT/model.safetensors (istr predict OUT IMAGE..., istr eval OUT).")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="run again in an existing non-empty --out: the previous "
                   "report, model and overlays are removed first (its synthetic data/ is reused when it matches)")
    _number_arg(p, "--iters", integer=True, min=1, help="training steps (default: the preset's demo setting, the "
                "same result on any machine; about 9 min on 2 CPU cores)")
    _number_arg(p, "--minutes", min=0, min_inclusive=False, help="also stop after this many minutes of training")
    p.add_argument("--data", choices=("easy", "hard"), default="easy",
                   help="easy (default: plain backgrounds, 4 shapes, 96 px) or hard (the research benchmark: "
                   "textured backgrounds, 8 shapes, small objects, 128 px)")
    p.add_argument("--model", choices=demo_models, default=default,
                   help=f"a preset with demo settings (default {default})")
    _number_arg(p, "--eval-every", integer=True, min=0, help="also evaluate every N steps (the AP curve)")
    _number_arg(p, "--num-train", integer=True, min=1, help="synthetic training images")
    _number_arg(p, "--num-val", integer=True, min=1, help="synthetic validation images")
    _number_arg(p, "--image-size", integer=True, min=8, help="synthetic image side in pixels")
    _number_arg(p, "--lr", min=0, min_inclusive=False, help="override the demo's learning rate")
    _number_arg(p, "--batch-size", integer=True, min=1, help="override the demo's batch size")
    _number_arg(p, "--seed", integer=True, min=0, help="random seed (default: the demo's)")
    p.add_argument("--device", default="cpu", help="where to train and evaluate, e.g. cuda (default cpu)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true",
                      help="start the backbone from timm's ImageNet weights (downloads them; default: random)")
    init.add_argument("--backbone-checkpoint", metavar="PATH",
                      help="start the backbone from a local timm-format checkpoint (.pth / .safetensors)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _check_device_flag(device: str | None) -> None:
    """--device must name a torch device this machine has ("auto" lets the trainer choose)."""
    if device is None or device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {exc}") from None
    check_device(device, "--device")


def _version() -> str:
    return f"istr {istr.__version__}"


# errors of bad input (arguments, files, data) end `istr` with one line and status 2; -v adds the traceback.
# TypeError and KeyError are not among them: where they come from user values (--model-arg, --codec-arg, names)
# the commands turn them into ValueErrors; elsewhere they are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RunLockedError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `istr` console script and of `python -m istr`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.threads is not None:
            torch.set_num_threads(check_number("--threads", args.threads, integer=True, min=1))
        _check_numbers(args)
        _check_device_flag(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        parser.exit(2, f"istr {args.command}: error: {_error_text(exc)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
