"""`istr` command line: fit-codec, train, eval, predict and demo, thin wrappers over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
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
    """A model file, a checkpoint dir (holding model.safetensors) or a training run dir -> the model file."""
    from istr.engine.checkpoint import MODEL_FILE, latest_checkpoint

    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        last = latest_checkpoint(path / "checkpoints")
        if last is not None:
            return last / MODEL_FILE
    raise FileNotFoundError(f"no model at {path}: expected a .safetensors model file, a checkpoint directory or a "
                            f"training run directory (with {MODEL_FILE} or checkpoints/)")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _dataset(images: str, ann: str, train: bool = False, augment: str = "none", aug_scale: float = 1.0):
    from istr.data import CocoInstances, build_transforms

    transforms = None
    if train and augment != "none":
        transforms = build_transforms(True, scale=aug_scale, crop_prob=0.5 if augment == "paper" else 0.0)
    return CocoInstances(images, ann, transforms=transforms, include_empty=not train)


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


def _print_metrics(metrics: dict[str, Any]) -> None:
    for kind in ("segm", "bbox"):
        if isinstance(metrics.get(kind), dict):
            row = "  ".join(f"{k} {v:.4f}" for k, v in metrics[kind].items() if isinstance(v, float))
            print(f"{'mask' if kind == 'segm' else 'box '}: {row}")


# ---------------------------------------------------------------------------------------------------- commands
def cmd_fit_codec(args: argparse.Namespace) -> int:
    import torch

    from istr.codecs import create_codec
    from istr.engine.fit_codec import coco_mask_grids

    codec = create_codec(args.codec, mask_size=args.mask_size, dim=args.dim, **parse_key_values(args.codec_arg, "--codec-arg"))
    grids = torch.cat([coco_mask_grids(a, codec.mask_size, max_masks=args.max_masks, seed=args.seed) for a in args.ann])
    print(f"fitting {args.codec} (M={codec.mask_size}, l={codec.dim}) on {len(grids)} masks from {len(args.ann)} file(s)")
    codec.fit(grids, **parse_key_values(args.fit_arg, "--fit-arg"))
    codec.save(args.out)
    report = {"codec": args.codec, "config": codec.config(), "fit_masks": len(grids), "out": str(args.out)}
    for name, anns in (("fit", None), ("val", args.val_ann)):
        g = grids if anns is None else torch.cat([coco_mask_grids(a, codec.mask_size) for a in anns])
        with torch.no_grad():
            recon = torch.cat([codec.decode(codec.encode(c)) for c in g.split(4096)])
        inter = ((recon >= 0.5) & (g >= 0.5)).flatten(1).sum(1).float()
        union = ((recon >= 0.5) | (g >= 0.5)).flatten(1).sum(1).float().clamp(min=1)
        report[f"{name}_mean_iou"] = float((inter / union).mean())
        if anns is None and not args.val_ann:
            break
    print(json.dumps(report, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from istr import create_model, load_codec
    from istr.engine.checkpoint import latest_checkpoint
    from istr.engine.distributed import cleanup_distributed
    from istr.engine.fit_codec import coco_mask_grids
    from istr.engine.train import TrainConfig, Trainer

    train_paths = _data_paths(args, "train")
    if train_paths is None:
        raise ValueError("no training data: give --train-images and --train-ann, or --synthetic ROOT")
    train_set = _dataset(*train_paths, train=True, augment=args.augment, aug_scale=args.aug_scale)
    val_paths = _data_paths(args, "val")
    val_set = _dataset(*val_paths) if val_paths and not args.no_eval else None
    codec = load_codec(args.codec) if args.codec else None
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=train_set.num_classes, codec=codec,
                         **parse_key_values(args.model_arg, "--model-arg"))
    resume: Path | None = None
    if args.resume == "auto":
        resume = latest_checkpoint(Path(args.out) / "checkpoints")
    elif args.resume:
        resume = Path(args.resume)
    if codec is None and resume is None:  # fit the preset's codec on the training masks
        grids = coco_mask_grids(train_paths[1], model.codec.mask_size, max_masks=args.codec_max_masks, seed=args.seed)
        print(f"fitting the {type(model.codec).__name__} on {len(grids)} training masks")
        model.codec.fit(grids)
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
    cfg = TrainConfig(**cfg_values, bf16=args.bf16, progress=not args.no_progress)
    trainer = Trainer(model, train_set, cfg, val_dataset=val_set, out_dir=args.out)
    if resume is not None:
        trainer.resume(resume)
    result = trainer.train()
    if trainer.is_main:
        print(f"trained {result.iterations} iterations in {result.elapsed_s:.1f}s ({result.stop_reason}); "
              f"model: {result.model_path}")
        if result.metrics:
            _print_metrics(result.metrics)
    cleanup_distributed()  # under torchrun: every rank leaves the process group together, before exit
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from istr import load_model
    from istr.engine.evaluate import evaluate

    paths = _data_paths(args, "val")
    if paths is None:
        raise ValueError("no evaluation data: give --images and --ann, or --synthetic ROOT")
    model = load_model(resolve_model_path(args.model), map_location=args.device)
    if args.detections is not None:
        model.detections_per_image = args.detections
    dataset = _dataset(*paths)
    if args.max_images:
        from torch.utils.data import Subset

        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))
    metrics = evaluate(model, dataset, batch_size=args.batch_size, all_stages=args.all_stages,
                       results_path=args.results, progress=not args.no_progress)
    _print_metrics(metrics)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2))
        print(f"metrics written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from istr import load_model
    from istr.data import load_image
    from istr.engine.predict import predict
    from istr.viz import draw_instances, save_image

    model = load_model(resolve_model_path(args.model), map_location=args.device)
    names = None
    if args.ann:
        cats = sorted(json.loads(Path(args.ann).read_text())["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "predictions.json").write_text(json.dumps(records, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from istr.demo import run_demo

    report = run_demo(args.out, minutes=args.minutes, threads=args.threads, seed=args.seed,
                      num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                      max_iters=args.max_iters, device=args.device, pretrained=args.pretrained,
                      backbone_checkpoint=args.backbone_checkpoint, progress=not args.no_progress,
                      **{k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None})
    print(f"demo written to {args.out}: mask AP {report['metrics']['segm']['AP']:.3f}, "
          f"box AP {report['metrics']['bbox']['AP']:.3f} after {report['iterations']} iterations "
          f"({report['train_seconds']:.0f}s)")
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit-codec", help="fit a mask codec on the GT masks of COCO json files",
                       description="Fit a mask codec (pca, dct, identity, autoencoder, ...) on the box-cropped GT "
                       "masks of one or more COCO instances files (no images needed) and save it.")
    p.add_argument("--ann", nargs="+", required=True, metavar="JSON", help="COCO instances json(s) to fit on")
    p.add_argument("--codec", default="pca", help="registered codec name (default: pca)")
    p.add_argument("--mask-size", type=int, default=28, help="M, side of the mask grids (default 28)")
    p.add_argument("--dim", type=int, default=60, help="l, embedding length (default 60)")
    p.add_argument("--codec-arg", nargs="*", metavar="K=V", help="extra codec constructor args, e.g. whiten=true")
    p.add_argument("--fit-arg", nargs="*", metavar="K=V", help="extra fit() args, e.g. epochs=20 (autoencoder)")
    p.add_argument("--max-masks", type=int, default=None, help="fit on a random subset of this many masks")
    p.add_argument("--val-ann", nargs="*", metavar="JSON", help="also report reconstruction IoU on these masks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="codec file to write (.safetensors)")
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
                   help="resume from CKPT, or (no value) from OUT's newest checkpoint")
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
    p.add_argument("--all-stages", action="store_true", help="also score every refinement stage")
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", metavar="JSON", help="write the COCO results json here")
    p.add_argument("--out", metavar="JSON", help="write the metrics here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="run a model on image files and save overlays",
                       description="Predict instances on image files; writes OUT/<name>_pred.png overlays and "
                       "OUT/predictions.json (boxes, labels, scores).")
    p.add_argument("model", help="model file, checkpoint directory or training run directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", default="runs/predict", help="output directory (default runs/predict)")
    p.add_argument("--score-threshold", type=float, default=0.4, help="drop detections below this (default 0.4)")
    p.add_argument("--ann", metavar="JSON", help="COCO json whose categories name the labels")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="synthetic data -> PCA codec -> train istr_tiny on CPU -> eval -> report",
                       description="The CPU demo: generate the synthetic shapes dataset, fit a PCA codec on its "
                       "training masks, train the istr_tiny preset for a wall-clock budget, evaluate, and write "
                       "OUT/report.md, metrics.json, loss_curve.png and prediction overlays.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes (default 10)")
    p.add_argument("--max-iters", type=int, default=None, help="also stop after this many iterations")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `istr` console script and of `python -m istr`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command == "train" and args.seed is None:
        args.seed = 40244023
    _set_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        parser.exit(2, f"istr {args.command}: error: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
