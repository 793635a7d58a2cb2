"""`istr` command line: fit-codec, train, eval, predict and demo, thin wrappers over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

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
    from istr.fileio import check_readable_file
    from istr.io import find_model_file

    return check_readable_file(find_model_file(path), "model file")


def _error_text(exc: BaseException) -> str:
    """One line for an exception: KeyError without its repr quotes, newlines folded."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
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
    """An output directory: not an existing file; an existing non-empty one only with --overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is an existing file; expected a directory (new, empty, or "
                              "with --overwrite one whose files may be replaced)")
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


def _remove_outputs(out: Path, names: Sequence[str]) -> None:
    """Remove the named files/folders a previous run wrote in `out` (--overwrite), so they cannot mix with new ones."""
    import shutil

    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _build(what: str, flag: str, factory, *args: Any, **kwargs: Any):
    """factory(*args, **kwargs); a constructor's TypeError (an unknown keyword) becomes a ValueError naming `flag`."""
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{flag} does not fit {what}: {_error_text(exc)}") from exc


def _check_registered(registry, name: str, flag: str) -> None:
    try:
        registry.get(name)
    except KeyError as exc:
        raise ValueError(f"{flag}: {_error_text(exc)}") from None


def _check_device(device: str | None) -> None:
    """--device must name a torch device this machine has ("auto" lets the trainer choose)."""
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _set_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _dataset(images: str, ann: str, train: bool = False, augment: str = "none", aug_scale: float = 1.0,
             segmentations: bool = False):
    from istr.data import CocoInstances, build_transforms

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


# ---------------------------------------------------------------------------------------------------- commands
# ISTR v1's codec (what istr.create_model("istr_r50_fpn_pca60") uses): `istr fit-codec`'s default for --codec pca
PCA_DEFAULTS: dict[str, Any] = {"whiten": True, "logit_space": True}


def _read_grids(ann_files: Sequence[str], mask_size: int, **kwargs: Any):
    """(grids [N, M, M] of all files, summed reader stats) through istr.engine.fit_codec.coco_mask_grids."""
    import torch

    from istr.engine.fit_codec import coco_mask_grids

    grids, total = [], {}
    for ann in ann_files:
        g, stats = coco_mask_grids(ann, mask_size, return_stats=True, **kwargs)
        grids.append(g)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    return torch.cat(grids), total


def cmd_fit_codec(args: argparse.Namespace) -> int:
    import torch

    from istr.codecs import CODECS, create_codec
    from istr.data.coco import describe_stats
    from istr.fileio import check_readable_file

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
    codec.save(out)
    report = {"codec": args.codec, "config": codec.config(), "fit_masks": len(grids), "fit_stats": stats,
              "out": str(out)}
    for name, anns in (("fit", None), ("val", args.val_ann)):
        if anns is None:
            g = grids
        else:
            g, report["val_stats"] = _read_grids(anns, codec.mask_size)
        with torch.no_grad():
            recon = torch.cat([codec.decode(codec.encode(c)) for c in g.split(4096)])
        inter = ((recon >= 0.5) & (g >= 0.5)).flatten(1).sum(1).float()
        union = ((recon >= 0.5) | (g >= 0.5)).flatten(1).sum(1).float().clamp(min=1)
        report[f"{name}_mean_iou"] = float((inter / union).mean())
        if anns is None and not args.val_ann:
            break
    print(json.dumps(report, indent=2))
    return 0


def _resume_path(resume: str | None, out: Path) -> Path | None:
    """--resume (no value: OUT's newest checkpoint, if any) / --resume CKPT (a checkpoint or a run directory)."""
    from istr.engine.checkpoint import MODEL_FILE, STATE_FILE, latest_checkpoint

    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out / "checkpoints")
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).exists() and (path / "checkpoints").is_dir():
        last = latest_checkpoint(path / "checkpoints")  # a training run directory
        path = last if last is not None else path
    if not path.is_dir() or not (path / STATE_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: expected a checkpoint directory (holding {MODEL_FILE} and "
                                f"{STATE_FILE}, e.g. OUT/checkpoints/iter_0005000) or a training run directory")
    return path


def _resume(trainer, path: Path) -> None:
    """trainer.resume(path), with a truncated or corrupt checkpoint reported as a ValueError naming it."""
    import pickle

    try:
        trainer.resume(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"cannot resume from {path}: the checkpoint is truncated or corrupt ({_error_text(exc)}); "
                         "resume from an earlier one (--resume OUT/checkpoints/iter_...) or start again with "
                         "--overwrite") from exc


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from istr import create_model, load_codec
    from istr.data.coco import describe_stats
    from istr.engine.distributed import cleanup_distributed
    from istr.engine.fit_codec import coco_mask_grids
    from istr.engine.train import TrainConfig, Trainer
    from istr.fileio import check_readable_file
    from istr.models.zoo import MODELS

    # every check that needs no data comes first
    _check_registered(MODELS, args.model, "--model")
    model_args = parse_key_values(args.model_arg, "--model-arg")
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again; pass one of them")
    resume = _resume_path(args.resume, out)
    _check_out_dir(out, "--out", overwrite=args.overwrite or bool(args.resume), resume_hint=True)
    if args.codec:
        check_readable_file(args.codec, "codec file")
    train_paths = _data_paths(args, "train")
    if train_paths is None:
        raise ValueError("no training data: give --train-images and --train-ann, or --synthetic ROOT")
    val_paths = _data_paths(args, "val")
    cfg_values = {k: v for k, v in {
        "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
        "accum_steps": args.accum_steps, "max_iters": args.max_iters, "max_minutes": args.minutes,
        "warmup_iters": args.warmup_iters, "warmup_factor": args.warmup_factor,
        "milestones": tuple(args.milestones) if args.milestones is not None else None, "gamma": args.gamma,
        "clip_grad_norm": args.clip_grad_norm, "seed": args.seed, "num_workers": args.workers,
        "device": args.device, "log_every": args.log_every, "eval_every": args.eval_every,
        "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints}.items() if v is not None}
    if args.max_iters is None and args.minutes is not None:
        cfg_values["max_iters"] = None
    if args.clip_grad_norm is not None and args.clip_grad_norm <= 0:
        cfg_values["clip_grad_norm"] = None
    # the final evaluation shows a progress bar unless --no-progress; Trainer times it apart from training
    cfg = TrainConfig(**cfg_values, bf16=args.bf16, progress=not args.no_progress)

    train_set = _dataset(*train_paths, train=True, augment=args.augment, aug_scale=args.aug_scale,
                         segmentations=model_args.get("target_crop") == "polygon")
    val_set = _dataset(*val_paths) if val_paths and not args.no_eval else None
    codec = load_codec(args.codec) if args.codec else None
    torch.manual_seed(args.seed)
    model = _build(f"the {args.model} preset", "--model-arg", create_model, args.model,
                   num_classes=train_set.num_classes, codec=codec, **model_args)
    if codec is None and resume is None and getattr(model, "codec", None) is not None:  # fit the preset's codec
        grids, stats = coco_mask_grids(train_paths[1], model.codec.mask_size, max_masks=args.codec_max_masks,
                                       seed=args.seed, return_stats=True)
        print(f"fitting the {type(model.codec).__name__} on {len(grids)} training masks ({describe_stats(stats)})")
        model.codec.fit(grids)
    # overwrite: Trainer deletes the previous run's files in OUT (checkpoints/, log.jsonl, model, results) first
    trainer = Trainer(model, train_set, cfg, val_dataset=val_set, out_dir=out, overwrite=args.overwrite)
    if resume is not None:
        _resume(trainer, resume)
    result = trainer.train()
    if trainer.is_main and val_paths:
        (out / RUN_FILE).write_text(json.dumps({"val_images": str(Path(val_paths[0]).resolve()),
                                                "val_ann": str(Path(val_paths[1]).resolve())}, indent=2))
    if trainer.is_main:
        evaluated = f"; evaluation {result.eval_s:.1f}s" if result.eval_s else ""
        print(f"trained {result.iterations} iterations in {result.elapsed_s:.1f}s of training "
              f"({result.stop_reason}){evaluated}; model: {result.model_path}")
        if result.metrics:
            _print_metrics(result.metrics)
    cleanup_distributed()  # under torchrun: every rank leaves the process group together, before exit
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from istr import load_model
    from istr.engine.evaluate import evaluate

    paths = _data_paths(args, "val") or _run_data(args.model)
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
    if args.max_images:
        from torch.utils.data import Subset

        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model, dataset, batch_size=args.batch_size, all_stages=args.all_stages,
                       results_path=results, progress=not args.no_progress)
    _print_metrics(metrics)
    if out is not None:
        from istr.fileio import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(metrics, indent=2).encode())
        print(f"metrics written to {out}")
    return 0


RUN_FILE = "run.json"  # in a run directory: the validation data it was evaluated on, for `istr eval RUN`


def _run_data(model: str | Path) -> tuple[str, str] | None:
    """(val images, val json) recorded in a run directory's run.json, or None."""
    path = Path(model) / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("val_images") and record.get("val_ann"):
        print(f"evaluating on the validation data recorded in {path}: {record['val_ann']}")
        return record["val_images"], record["val_ann"]
    return None


def _category_names(ann: str | Path) -> list[str]:
    """Names by contiguous label (categories sorted by id) from the "categories" of a COCO json."""
    from istr.fileio import read_json

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
    from istr import load_model
    from istr.data import load_image
    from istr.engine.predict import predict
    from istr.fileio import atomic_write_bytes, check_readable_file
    from istr.viz import draw_instances, save_image

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
                "model.safetensors", "run.json")


def cmd_demo(args: argparse.Namespace) -> int:
    from istr.demo import run_demo

    out = _check_out_dir(args.out, "--out", args.overwrite)
    if args.backbone_checkpoint is not None:
        from istr.fileio import check_readable_file

        check_readable_file(args.backbone_checkpoint, "backbone checkpoint")
    if args.pretrained:
        from istr.hub import check_pretrained_available

        check_pretrained_available("resnet18")  # the demo's backbone; fails in seconds without a network
    if args.overwrite:
        _remove_outputs(out, DEMO_OUTPUTS)
    report = run_demo(out, iters=args.iters, minutes=args.minutes, data=args.data, model=args.model,
                      threads=args.threads, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                      image_size=args.image_size, device=args.device, pretrained=args.pretrained,
                      backbone_checkpoint=args.backbone_checkpoint, progress=not args.no_progress,
                      eval_every=args.eval_every,
                      **{k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None})
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
    parser = argparse.ArgumentParser(prog="istr", description="ISTR instance segmentation: fit codecs, train, "
                                     "evaluate, predict, and run the CPU demo.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level; show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit-codec", help="fit a mask codec on the GT masks of COCO json files",
                       description="Fit a mask codec (pca, dct, identity, autoencoder, ...) on the box-cropped GT "
                       "masks of one or more COCO instances files (no images needed) and save it.")
    p.add_argument("--ann", nargs="+", required=True, metavar="JSON", help="COCO instances json(s) to fit on")
    p.add_argument("--codec", default="pca", help="registered codec name (default: pca, built as ISTR v1's whitened "
                   "logit-space PCA: whiten=true logit_space=true unless --codec-arg says otherwise)")
    p.add_argument("--mask-size", type=int, default=28, help="M, side of the mask grids (default 28)")
    p.add_argument("--dim", type=int, default=60, help="l, embedding length (default 60)")
    p.add_argument("--codec-arg", nargs="*", metavar="K=V", help="extra codec constructor args, e.g. whiten=true")
    p.add_argument("--fit-arg", nargs="*", metavar="K=V", help="extra fit() args, e.g. epochs=20 (autoencoder)")
    p.add_argument("--max-masks", type=int, default=None, help="fit on a random subset of this many masks")
    p.add_argument("--crop", choices=("roi_align", "polygon"), default="roi_align",
                   help="how masks are cropped into grids: soft RoIAlign crops (default, as ISTR's targets) or the "
                   "authors' binary polygon rasterisation (pair with --model-arg target_crop=polygon)")
    p.add_argument("--val-ann", nargs="*", metavar="JSON", help="also report reconstruction IoU on these masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="codec file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_fit_codec)

    p = sub.add_parser("train", help="train a model (single process, or multi-GPU/multi-node under torchrun)",
                       description="Train a model preset on COCO-format data. Without --codec the preset's codec "
                       "is fitted on the training masks first. Writes OUT/log.jsonl, OUT/checkpoints/, "
                       "OUT/model.safetensors. Multi-GPU: torchrun --nproc_per_node N -m istr train ...")
    _add_data_args(p, ("train", "val"))
    p.add_argument("--model", default="istr_tiny", help="model preset (istr.list_models()); default istr_tiny")
    p.add_argument("--model-arg", nargs="*", metavar="K=V", help="preset overrides, e.g. num_queries=20 min_size=128")
    p.add_argument("--codec", metavar="PATH", help="a fitted codec file (istr fit-codec)")
    p.add_argument("--codec-max-masks", type=int, default=None, help="masks used to fit the codec (default all)")
    p.add_argument("--augment", choices=("none", "flip", "paper"), default="flip",
                   help="training augmentation: none, h-flip, or the paper's flip + random resize-crop")
    p.add_argument("--aug-scale", type=float, default=1.0, help="scale of the paper's crop sizes (e.g. 0.25)")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT (a checkpoint or run directory), or (no value) from OUT's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="train afresh in an existing non-empty --out: its "
                   "previous checkpoints/, log.jsonl, model and results are removed first")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation even if validation data is given")
    g = p.add_argument_group("training config (defaults: istr.engine.TrainConfig, the paper's recipe)")
    for flag, typ, helptext in (
        ("--lr", float, "AdamW learning rate (paper 2.5e-5)"), ("--weight-decay", float, "AdamW weight decay"),
        ("--batch-size", int, "images per forward per process"), ("--accum-steps", int, "micro-batches per step"),
        ("--max-iters", int, "optimizer steps"), ("--minutes", float, "wall-clock budget in minutes"),
        ("--warmup-iters", int, "linear warmup steps"), ("--warmup-factor", float, "warmup start factor"),
        ("--gamma", float, "lr decay factor at each milestone"),
        ("--clip-grad-norm", float, "global grad-norm clip (<= 0 disables)"), ("--seed", int, "random seed"),
        ("--workers", int, "DataLoader workers"), ("--device", str, "auto, cpu, cuda, cuda:1, ..."),
        ("--log-every", int, "iterations between log lines"), ("--eval-every", int, "iterations between evals"),
        ("--checkpoint-every", int, "iterations between checkpoints"),
        ("--keep-checkpoints", int, "checkpoints kept on disk")):
        g.add_argument(flag, type=typ, default=None, help=helptext)
    g.add_argument("--milestones", type=int, nargs="*", default=None, help="iterations where lr *= gamma")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, seed=None)

    p = sub.add_parser("eval", help="COCO box/mask AP of a trained model on a COCO-format dataset",
                       description="Evaluate a model (a .safetensors file, a checkpoint dir or a run dir) with "
                       "pycocotools COCOeval (bbox and segm).")
    p.add_argument("model", help="model file, checkpoint directory or training run directory")
    p.add_argument("--images", dest="val_images", metavar="DIR", help="image directory")
    p.add_argument("--ann", dest="val_ann", metavar="JSON", help="COCO instances json")
    p.add_argument("--synthetic", metavar="ROOT", help="evaluate on ROOT's val split (make_synthetic_coco)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--detections", type=int, default=None, help="override detections per image")
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
    p.add_argument("--score-threshold", type=float, default=0.4, help="drop detections below this (default 0.4)")
    p.add_argument("--ann", metavar="JSON", help="COCO json whose categories name the labels (default: the "
                   "categories saved with the model, if any)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="synthetic data -> PCA codec -> train istr_tiny on CPU -> eval -> report",
                       description="The demo: generate the synthetic shapes dataset, fit a PCA codec on its "
                       "training masks, train the istr_tiny preset for a fixed number of steps, evaluate, and write "
                       "OUT/report.md, metrics.json, loss_curve.png, prediction overlays and OUT/model.safetensors "
                       "(istr predict OUT IMAGE..., istr eval OUT).")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="run again in an existing non-empty --out: the previous "
                   "report, model and overlays are removed first (its synthetic data/ is reused when it matches)")
    p.add_argument("--iters", type=int, default=None,
                   help="training steps (default 2100: the same result on any machine, about 9 min on 2 CPU cores)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this many minutes of training")
    p.add_argument("--data", choices=("easy", "hard"), default="easy",
                   help="easy (default: plain backgrounds, 4 shapes, 96 px) or hard (the research benchmark: "
                   "textured backgrounds, 8 shapes, small objects, 128 px)")
    p.add_argument("--model", choices=("istr_tiny", "isda_tiny"), default="istr_tiny")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (the AP curve)")
    p.add_argument("--num-train", type=int, default=None, help="synthetic training images")
    p.add_argument("--num-val", type=int, default=None, help="synthetic validation images")
    p.add_argument("--image-size", type=int, default=None, help="synthetic image side in pixels")
    p.add_argument("--lr", type=float, default=None, help="override the demo's learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="override the demo's batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to train and evaluate, e.g. cuda (default cpu)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true",
                      help="start the ResNet-18 from timm's ImageNet weights (downloads them; default: random)")
    init.add_argument("--backbone-checkpoint", metavar="PATH",
                      help="start the ResNet-18 from a local timm-format checkpoint (.pth / .safetensors)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from istr import __version__

    return f"istr {__version__}"


# errors of bad input (arguments, files, data) end `istr` with one line and status 2; -v adds the traceback
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `istr` console script and of `python -m istr`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "train" and args.seed is None:
        args.seed = 40244023
    try:
        _set_threads(args.threads)
        _check_device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        parser.exit(2, f"istr {args.command}: error: {_error_text(exc)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
