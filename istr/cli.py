"""`istr` command line: the parser and main(); the commands are in istr.cli_commands, what they share in
istr.cli_common.

`istr train`'s training options are generated from istr.engine.TrainConfig's fields (name, type, default and help
in one place); every number a command takes is checked by istr.checks.check_number, as the API checks it.
Bad input (arguments, files, data) ends a command with one line `istr <command>: error: ...` and status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Sequence

import torch

import istr
import istr.convert as convert_cli
from istr.checks import check_number
from istr.cli_commands import cmd_demo, cmd_eval, cmd_fit_codec, cmd_predict, cmd_train
from istr.cli_common import (add_config_args, check_device_flag, check_numbers, config_from_args, error_text,
                             number_arg, parse_key_values, resolve_model_path)
from istr.engine.rundir import RunLockedError
from istr.export import add_cli as add_export_cli
from istr.models import default_model, list_models

__all__ = ["main", "build_parser", "resolve_model_path", "parse_key_values", "config_from_args"]

logger = logging.getLogger("istr")


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
    number_arg(p, "--mask-size", integer=True, default=28, min=1, help="M, side of the mask grids (default 28)")
    number_arg(p, "--dim", integer=True, default=60, min=1, help="l, embedding length (default 60)")
    p.add_argument("--codec-arg", nargs="*", metavar="K=V", help="extra codec constructor args, e.g. whiten=true")
    p.add_argument("--fit-arg", nargs="*", metavar="K=V", help="extra fit() args, e.g. epochs=20 (autoencoder)")
    number_arg(p, "--max-masks", integer=True, min=1, help="fit on a random subset of this many masks")
    p.add_argument("--crop", choices=("roi_align", "polygon"), default="roi_align",
                   help="how masks are cropped into grids: soft RoIAlign crops (default, as ISTR's targets) or the "
                   "authors' binary polygon rasterisation (pair with --model-arg target_crop=polygon)")
    p.add_argument("--val-ann", nargs="*", metavar="JSON", help="also report reconstruction IoU on these masks")
    number_arg(p, "--seed", integer=True, default=0, min=0, help="seed of the --max-masks subset (default 0)")
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
    p.add_argument("--init", metavar="PATH", help="start from these weights: an istr model file, or the authors' "
                   "checkpoint converted on the fly (istr convert); matching tensors load, the summary is printed")
    p.add_argument("--init-source", choices=convert_cli.SOURCES, help="the --init checkpoint's origin (default: "
                   "detected from its keys)")
    p.add_argument("--init-pca", metavar="FILE", help="istr-v1 --init: the authors' PCA components .npz (optional)")
    number_arg(p, "--codec-max-masks", integer=True, min=1, help="masks used by prepare_training to fit the "
                "codec (default all)")
    p.add_argument("--augment", choices=("none", "flip", "paper"), default="flip",
                   help="training augmentation: none, h-flip, or the paper's flip + random resize-crop")
    number_arg(p, "--aug-scale", default=1.0, min=0, min_inclusive=False,
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
    number_arg(p, "--max-images", integer=True, min=1, help="evaluate the first N images only")
    number_arg(p, "--batch-size", integer=True, default=1, min=1, help="images per forward (default 1)")
    number_arg(p, "--detections", integer=True, min=1, help="override detections per image")
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
    number_arg(p, "--score-threshold", default=0.4, min=0, max=1,
                help="drop detections below this, in [0, 1] (default 0.4)")
    p.add_argument("--ann", metavar="JSON", help="COCO json whose categories name the labels (default: the "
                   "categories saved with the model, if any)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="convert the authors' ISTR v1 / Deformable DETR checkpoints to a model file",
                       description=convert_cli.DESCRIPTION)
    convert_cli.add_arguments(p)
    p.set_defaults(func=convert_cli.cmd_convert)

    add_export_cli(sub)

    demo_models = list_models(demo=True)
    p = sub.add_parser("demo", help=f"synthetic data -> train a small preset ({default}) on CPU -> eval -> report",
                       description="The demo: generate the synthetic shapes dataset, prepare the model on its "
                       "training masks (a PCA codec for ISTR), train a small preset for a fixed number of steps, "
                       "evaluate, and write OUT/report.md, metrics.json, loss_curve.png, prediction overlays and "
                       "OUT/model.safetensors (istr predict OUT IMAGE..., istr eval OUT).")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="run again in an existing non-empty --out: the previous "
                   "report, model and overlays are removed first (its synthetic data/ is reused when it matches)")
    number_arg(p, "--iters", integer=True, min=1, help="training steps (default: the preset's demo setting, the "
                "same result on any machine; about 9 min on 2 CPU cores)")
    number_arg(p, "--minutes", min=0, min_inclusive=False, help="also stop after this many minutes of training")
    p.add_argument("--data", choices=("easy", "hard"), default="easy",
                   help="easy (default: plain backgrounds, 4 shapes, 96 px) or hard (the research benchmark: "
                   "textured backgrounds, 8 shapes, small objects, 128 px)")
    p.add_argument("--model", choices=demo_models, default=default,
                   help=f"a preset with demo settings (default {default})")
    number_arg(p, "--eval-every", integer=True, min=0, help="also evaluate every N steps (the AP curve)")
    number_arg(p, "--num-train", integer=True, min=1, help="synthetic training images")
    number_arg(p, "--num-val", integer=True, min=1, help="synthetic validation images")
    number_arg(p, "--image-size", integer=True, min=8, help="synthetic image side in pixels")
    number_arg(p, "--lr", min=0, min_inclusive=False, help="override the demo's learning rate")
    number_arg(p, "--batch-size", integer=True, min=1, help="override the demo's batch size")
    number_arg(p, "--seed", integer=True, min=0, help="random seed (default: the demo's)")
    p.add_argument("--device", default="cpu", help="where to train and evaluate, e.g. cuda (default cpu)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", action="store_true",
                      help="start the backbone from timm's ImageNet weights (downloads them; default: random)")
    init.add_argument("--backbone-checkpoint", metavar="PATH",
                      help="start the backbone from a local timm-format checkpoint (.pth / .safetensors)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


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
        check_numbers(args)
        check_device_flag(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        parser.exit(2, f"istr {args.command}: error: {error_text(exc)}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
