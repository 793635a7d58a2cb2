"""Same data, same wall-clock budget, same machine, same evaluator: ISTR (istr_tiny, the demo) vs torchvision Mask R-CNN.

    python benchmarks/train_budget.py --minutes 10 --out benchmarks/results/train_budget

ISTR is the demo's model and settings (istr.demo: synthetic shapes, --data easy or hard, PCA-60, istr_tiny with
denoising x2). Mask R-CNN is torchvision's MaskRCNN on a ResNet-18 FPN (ISTR-tiny's backbone family, weights=None,
trainable BatchNorm, anchors scaled to the small images). Both are trained by the same istr Trainer (same sampler,
flips, AdamW, warmup, clipping, and an lr decay at 80% of the steps the budget allows:
istr.engine.callbacks.ScheduleToBudget) and scored by the same istr.engine.evaluate (pycocotools). Writes
train_budget.json and train_budget.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "train_budget"
MASK_RCNN = "Mask R-CNN (R18-FPN)"


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind istr's conventions: labels 0..C-1 (torchvision keeps 0 for the
    background) and a loss dict with the total under "loss"."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]] | None = None):
        if self.training:
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1, "masks": t["masks"]} for t in targets]
            losses = self.model(images, shifted)
            return {**losses, "loss": sum(losses.values())}
        return [{**out, "labels": out["labels"] - 1} for out in self.model(images)]


def build_mask_rcnn(num_classes: int, image_size: int, backbone: str = "resnet18") -> TorchvisionDetector:
    """Mask R-CNN with a randomly initialised ResNet FPN, sized for small images and a CPU budget.

    Changes from torchvision's COCO defaults (all standard knobs): anchors 8..128 px (the images are ~128 px),
    RPN keeps 600/300 proposals (train) and 300/100 (test) instead of 2000/2000 and 1000/1000, the box head samples
    64 RoIs per image instead of 512, and the mask head has 2 convs of 128 channels instead of 4 of 256 (with the
    defaults one CPU step at 64 px took 12-15 s, nearly all in the mask head).
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(body, num_classes=None, min_size=image_size, max_size=image_size,
                     rpn_anchor_generator=anchors, rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                     rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
                     box_predictor=FastRCNNPredictor(1024, num_classes + 1),
                     mask_head=MaskRCNNHeads(body.out_channels, (128, 128), 1),
                     mask_predictor=MaskRCNNPredictor(128, 128, num_classes + 1))
    return TorchvisionDetector(model)


def train_in_budget(model: nn.Module, data_dir: Path, out_dir: Path, minutes: float, lr: float, backbone_lr_mult: float,
                    batch_size: int, seed: int, progress: bool) -> dict[str, Any]:
    """Train `model` for `minutes` with the demo's recipe and a budget-fitted lr decay; evaluate on the val split."""
    from istr.data import CocoInstances, build_transforms
    from istr.demo import demo_settings
    from istr.engine.callbacks import ScheduleToBudget
    from istr.engine.evaluate import evaluate
    from istr.engine.train import TrainConfig, Trainer

    DEMO_TRAIN = demo_settings("istr_tiny")["train"]

    train_set = CocoInstances(data_dir / "train", data_dir / "annotations" / "instances_train.json",
                              transforms=build_transforms(True, crop_prob=0.0))
    val_set = CocoInstances(data_dir / "val", data_dir / "annotations" / "instances_val.json", include_empty=True)
    cfg = TrainConfig(lr=lr, backbone_lr_mult=backbone_lr_mult, batch_size=batch_size, max_iters=None,
                      max_minutes=minutes, warmup_iters=DEMO_TRAIN["warmup_iters"], milestones=(),
                      gamma=DEMO_TRAIN["gamma"], clip_grad_norm=DEMO_TRAIN["clip_grad_norm"], seed=seed,
                      checkpoint_every=0, log_every=10, progress=progress, device="cpu", eval_at_end=False)
    trainer = Trainer(model, train_set, cfg, out_dir=out_dir, overwrite=True,
                      callbacks=[ScheduleToBudget(DEMO_TRAIN["decay_at"])])
    result = trainer.train()
    t0 = time.perf_counter()
    metrics = evaluate(model, val_set, progress=False)
    return {"metrics": {k: metrics[k] for k in ("bbox", "segm")}, "iterations": result.iterations,
            "train_seconds": round(result.elapsed_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
            "images_seen": result.iterations * batch_size, "lr": f"{lr:g}" + (
                f" (backbone {lr * backbone_lr_mult:g})" if backbone_lr_mult != 1.0 else ""),
            "batch_size": batch_size, "milestones": list(cfg.milestones),
            "parameters": sum(p.numel() for p in model.parameters())}


def _markdown(report: dict[str, Any]) -> str:
    cols = ["AP", "AP50", "AP75", "APs", "APm"]
    fmt = lambda v: "n/a" if v < 0 else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Same budget ({report['minutes']:g} min of training), same data, same machine, same evaluator", "",
             "| model | params | AdamW lr | iterations | images seen | " + " | ".join(f"mask {c}" for c in cols)
             + " | box AP | box AP50 |", "|---" * (7 + len(cols)) + "|"]
    for name, r in report["runs"].items():
        m = r["metrics"]
        lines.append(f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['lr']} | {r['iterations']} | {r['images_seen']} | "
                     + " | ".join(fmt(m["segm"][c]) for c in cols)
                     + f" | {fmt(m['bbox']['AP'])} | {fmt(m['bbox']['AP50'])} |")
    mach = report["machine"]
    lines += ["", f"Data: {report['data']}. Machine: {mach['cpu']}, {mach['cores']} cores, "
              f"{mach['torch_threads']} torch threads, torch {mach['torch']}; load average at start "
              f"{mach.get('load_average_1m')} (above the core count means the CPU was shared).",
              "Both trained by istr.engine.Trainer (AdamW, warmup, grad clip 1.0, h-flip, lr x0.1 at 80% of the "
              "iterations that fit the budget) and scored by istr.engine.evaluate (pycocotools COCOeval); AP in %."]
    if report["runs"][MASK_RCNN].get("reused_from"):
        was = report["runs"][MASK_RCNN]["machine"]
        lines.append(f"Mask R-CNN's run: reused from {report['runs'][MASK_RCNN]['reused_from']} (same data and "
                     f"budget; {was['cpu']}, {was['cores']} cores, load average at its start {was.get('load_average_1m')}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--maskrcnn-lr", type=float, default=1e-4, help="AdamW lr for Mask R-CNN")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", choices=("easy", "hard"), default="easy", help="the demo's data (default easy)")
    parser.add_argument("--maskrcnn-from", type=Path, default=None,
                        help="reuse the Mask R-CNN run of an earlier train_budget.json (its data and budget must match; "
                             "its machine is reported, not checked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from istr.data import make_synthetic_coco
    from istr.demo import DEMO_DATA, build_demo_model, demo_settings, machine_info

    demo = demo_settings("istr_tiny")

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    machine = machine_info()  # before training: the load average tells whether the CPU was shared
    args.out.mkdir(parents=True, exist_ok=True)
    data_cfg = DEMO_DATA[args.data]
    data_dir = args.out / f"data_{args.data}"
    if not (data_dir / "done").is_file():
        make_synthetic_coco(data_dir, **data_cfg)
        (data_dir / "done").write_text(json.dumps(data_cfg))
    size = data_cfg["image_size"]
    istr_model, _, _ = build_demo_model(data_dir, "istr_tiny", {"min_size": size, "max_size": size}, seed=args.seed)
    istr_run = train_in_budget(istr_model, data_dir, args.out / "istr", args.minutes, demo["train"]["lr"],
                               demo["train"]["backbone_lr_mult"], args.batch_size, args.seed, not args.no_progress)
    istr_name = f"ISTR (istr_tiny, PCA-60, denoising training x{demo['model']['denoising_groups']})"
    if args.maskrcnn_from is not None:
        earlier = json.loads(args.maskrcnn_from.read_text())
        if earlier["data"] != data_cfg or earlier["minutes"] != args.minutes:
            raise ValueError(f"{args.maskrcnn_from} was run on other data or another budget: {earlier['data']}, "
                             f"{earlier['minutes']} min vs {data_cfg}, {args.minutes} min")
        mrcnn = {**earlier["runs"][MASK_RCNN], "reused_from": str(args.maskrcnn_from), "machine": earlier["machine"]}
    else:
        torch.manual_seed(args.seed)
        mrcnn = train_in_budget(build_mask_rcnn(istr_model.num_classes, size), data_dir, args.out / "mask_rcnn",
                                args.minutes, args.maskrcnn_lr, 1.0, args.batch_size, args.seed, not args.no_progress)
        mrcnn["model"] = ("torchvision MaskRCNN, resnet18 FPN (weights=None, BatchNorm), anchors 8-128, "
                          "64 RoIs/image, 2x128 mask head")
    report = {"minutes": args.minutes, "data": data_cfg, "machine": machine,
              "runs": {istr_name: istr_run, MASK_RCNN: mrcnn}}
    (args.out / "train_budget.json").write_text(json.dumps(report, indent=2))
    (args.out / "train_budget.md").write_text(_markdown(report))
    print(_markdown(report))
    return report


if __name__ == "__main__":
    main()
