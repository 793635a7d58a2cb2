"""The `istr` commands: fit-codec, train, eval, predict and demo, each a thin wrapper over the Python API."""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Subset

from istr.cli_common import (build, check_model_name, check_out_dir, check_out_file, check_registered, coco_dataset,
                             config_from_args, data_paths, error_text, parse_key_values, print_metrics, pct,
                             resolve_model_path)
from istr.codecs import CODECS, create_codec, load_codec
from istr.data import load_image
from istr.data.coco import describe_stats
from istr.engine.distributed import cleanup_distributed
from istr.engine.evaluate import evaluate
from istr.engine.fit_codec import coco_mask_grids
from istr.engine.predict import predict
from istr.engine.rundir import RunDir, RunLockedError, write_error
from istr.engine.train_loop import Trainer
from istr.export import ExportedPredictor, is_exported_model
from istr.fileio import atomic_write_bytes, check_readable_file, read_json
from istr.io import CorruptFileError, MODEL_FILE, load_model
from istr.models import create_model, preset_info
from istr.viz import draw_instances, save_image

__all__ = ["cmd_fit_codec", "cmd_train", "cmd_eval", "cmd_predict", "cmd_demo", "PCA_DEFAULTS"]


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
    check_registered(CODECS, args.codec, "--codec")
    codec_args = parse_key_values(args.codec_arg, "--codec-arg")
    fit_args = parse_key_values(args.fit_arg, "--fit-arg")
    if args.codec == "pca":
        codec_args = {**PCA_DEFAULTS, **codec_args}
    out = check_out_file(args.out, "--out", args.overwrite)
    for ann in [*args.ann, *(args.val_ann or [])]:
        check_readable_file(ann, "annotation json")
    codec = build(f"the {args.codec} codec", "--codec-arg", create_codec, args.codec, mask_size=args.mask_size,
                   dim=args.dim, **codec_args)
    grids, stats = _read_grids(args.ann, codec.mask_size, max_masks=args.max_masks, seed=args.seed, crop=args.crop)
    settings = ", ".join(f"{k}={v}" for k, v in codec.config().items())
    print(f"fitting {args.codec} ({settings}) on {len(grids)} masks from {len(args.ann)} file(s) "
          f"({describe_stats(stats)})")
    build(f"{type(codec).__name__}.fit()", "--fit-arg", codec.fit, grids, **fit_args)
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
        raise ValueError(f"cannot resume from {path}: the checkpoint is truncated or corrupt ({error_text(exc)}); "
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
    check_model_name(args.model)
    model_args = parse_key_values(args.model_arg, "--model-arg")
    cfg = config_from_args(args)
    out = Path(args.out)
    run = RunDir(out)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again; pass one of them")
    run.check_not_locked()
    resume = run.find_checkpoint(args.resume) if args.resume else None
    check_out_dir(out, "--out", overwrite=args.overwrite or bool(args.resume), resume_hint=True)
    if args.codec:
        check_readable_file(args.codec, "codec file")
    train_paths = data_paths(args, "train")
    if train_paths is None:
        raise ValueError("no training data: give --train-images and --train-ann, or --synthetic ROOT")
    val_paths = data_paths(args, "val")

    train_set = coco_dataset(*train_paths, train=True, augment=args.augment, aug_scale=args.aug_scale,
                         segmentations=model_args.get("target_crop") == "polygon")
    val_set = coco_dataset(*val_paths) if val_paths and not args.no_eval else None
    codec = load_codec(args.codec) if args.codec else None
    if codec is not None and resume is not None:
        _check_same_codec(codec, resume, "--codec")
    torch.manual_seed(cfg.seed)
    model = build(f"the {args.model} preset", "--model-arg", create_model, args.model,
                   num_classes=train_set.num_classes, **({"codec": codec} if codec is not None else {}), **model_args)
    if args.init is not None:
        if resume is not None:
            raise ValueError("--init starts a run from other weights and --resume continues this one; pass one of them")
        from istr.convert import load_init

        print(load_init(model, check_readable_file(args.init, "--init file"), source=args.init_source,
                        pca_path=args.init_pca).summary())
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
            print_metrics(result.metrics)
    cleanup_distributed()  # under torchrun: every rank leaves the process group together, before exit
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    paths = data_paths(args, "val")
    if paths is None and Path(args.model).is_dir():
        run = RunDir(args.model)
        paths = run.val_data()
        if paths is not None:
            print(f"evaluating on the validation data recorded in {run.record_file}: {paths[1]}")
    if paths is None:
        raise ValueError("no evaluation data: give --images and --ann, or --synthetic ROOT (a run directory "
                         "written by istr train with validation data, or by istr demo, remembers its own)")
    out = check_out_file(args.out, "--out", args.overwrite)
    results = check_out_file(args.results, "--results", args.overwrite)
    if out is not None and results is not None and out.resolve() == results.resolve():
        raise ValueError(f"--out and --results are the same file ({out}); give two paths")
    model_path = resolve_model_path(args.model)
    dataset = coco_dataset(*paths)
    model = load_model(model_path, map_location=args.device)
    if args.detections is not None:
        model.detections_per_image = args.detections
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model, dataset, batch_size=args.batch_size, all_stages=args.all_stages,
                       results_path=results, progress=not args.no_progress)
    print_metrics(metrics)
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
    out = check_out_dir(args.out, "--out", args.overwrite)
    for path in args.images:
        check_readable_file(path, "image file")
    names = _category_names(args.ann) if args.ann else None
    if is_exported_model(args.model):  # an ONNX / torch.export file from istr export: the same results dicts
        model = ExportedPredictor(args.model)
        run = lambda image: model(image, score_threshold=args.score_threshold)  # noqa: E731
        categories = model.metadata.get("categories")
    else:
        model = load_model(resolve_model_path(args.model), map_location=args.device)
        run = lambda image: predict(model, image, score_threshold=args.score_threshold)  # noqa: E731
        categories = getattr(model, "categories", None)
    if names is None and categories:  # the training set's categories, saved with the model
        names = [str(c.get("name", i)) for i, c in enumerate(categories)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").unlink(missing_ok=True)  # a failure below must not leave an earlier run's results
    records = []
    for path in args.images:
        image = load_image(path)
        result = run(image)
        overlay = out / (Path(path).stem + "_pred.png")
        save_image(draw_instances(image, result, class_names=names, score_threshold=args.score_threshold), overlay)
        records.append({"image": str(path), "overlay": str(overlay), "boxes": result["boxes"].tolist(),
                        "labels": result["labels"].tolist(), "scores": [round(s, 4) for s in result["scores"].tolist()],
                        "names": [names[i] if names and i < len(names) else str(i) for i in result["labels"].tolist()]})
        print(f"{path}: {len(result['scores'])} instances -> {overlay}")
    atomic_write_bytes(out / "predictions.json", json.dumps(records, indent=2).encode())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from istr.demo import run_demo  # the demo's recipe library: imported only by the command that runs it

    out = check_out_dir(args.out, "--out", args.overwrite)
    if args.backbone_checkpoint is not None:
        check_readable_file(args.backbone_checkpoint, "backbone checkpoint")
    if args.pretrained:
        from istr.hub import check_pretrained_available

        backbone = preset_info(args.model).defaults.get("backbone")
        if isinstance(backbone, str):
            check_pretrained_available(backbone)  # the demo's backbone; fails in seconds without a network
    given = {k: getattr(args, k) for k in ("iters", "minutes", "seed", "num_train", "num_val", "image_size", "lr",
                                           "batch_size", "eval_every") if getattr(args, k) is not None}
    report = run_demo(out, data=args.data, model=args.model, threads=args.threads, device=args.device,
                      pretrained=args.pretrained, backbone_checkpoint=args.backbone_checkpoint,
                      progress=not args.no_progress, overwrite=args.overwrite, **given)
    m = report["metrics"]
    print(f"demo written to {out}: mask AP {pct(m['segm']['AP'])}, box AP {pct(m['bbox']['AP'])} (%) after "
          f"{report['iterations']} iterations ({report['train_seconds']:.0f}s of training, "
          f"{report['seconds_per_iter']:.2f}s per iteration, {report['eval_seconds']:.0f}s of evaluation); "
          f"see {out / 'report.md'}. Next: istr predict {out} IMAGE...  |  istr eval {out}")
    return 0
