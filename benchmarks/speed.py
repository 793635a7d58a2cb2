"""Inference latency: ISTR (istr_r50_fpn_pca60) and ISDA (isda_r50) vs torchvision Mask R-CNN R50-FPN, random
weights, same input.

All models run batch 1 on the same image in one process, alternating run by run so that all see the same
machine load (the order rotating each round); the script prints the medians and the ratios to Mask R-CNN (for ISDA
also the median and range of its round-by-round ratios), and writes JSON if --out is given.
ISDA (--no-isda to skip it) runs its deformable encoder over P3..P6 (about 20k tokens at 800x1216), six decoder
layers over 300 queries and the mask feature map at 1/4; its top-100 masks are scored by maskness, empty ones
dropped, the rest resized to the image (no pasting into boxes).
It also times ISTR's transform + ResNet-50 + FPN alone (the part both models share): its ratio to Mask R-CNN
is the floor that no ISTR head, however cheap, can go below.

Fairness. Both use the same torchvision/timm ResNet-50 + FPN with frozen BatchNorm, min_size 800 / max_size
1333, and return 100 detections with soft masks pasted at the original size. A randomly initialised Mask
R-CNN scores every class of every proposal near 1/91, so with its default box_score_thresh=0.05 it keeps
nothing and its mask head never runs (unfairly cheap). With box_score_thresh=0.0 it keeps all 1000 x 90
(box, class) candidates and spends its time in per-class NMS over 90k boxes (unfairly dear; a trained model
passes a few hundred candidates). The default "calibrated" mode sets the threshold to the score of the
--candidates-th best candidate of this image (default 1000), so NMS sees about as many boxes as a trained
model's and it still returns its full 100 detections; "--mrcnn-thresh 0" gives the other bound.
A randomly initialised ISTR, in turn, predicts random box deltas that compound over 6 stages and push most
boxes out of the image (they are then dropped and never pasted). The script zeroes the last layer of each
stage's box branch (the head's FLOPs are unchanged), so the boxes stay the learnable query boxes, and sets
those to random object-like boxes (--istr-boxes random, default: centres uniform in the image, sides 5-50%
of it) or leaves them at the whole image (--istr-boxes whole: every mask pasted over the full image, ISTR's
most expensive case). Either way ISTR returns its full 100 detections. The mean box area of both models'
detections is printed, since pasting costs scale with it.
A randomly initialised ISDA's masks are mostly empty at the 0.5 threshold (12 of its top 100 kept here), and empty
masks are dropped; a trained one returns its 100. ISDA's cost per detection does not depend on the mask's shape
(every mask map is upsampled to the whole image, binarised and boxed), so by default (--isda-masks all) the script
sets its mask threshold to 0: every mask is kept (as the whole image) and ISDA returns 100 detections like the others.

  python benchmarks/speed.py --threads 2 --repeats 5
  python benchmarks/speed.py --device cuda --dtype bf16 --width 1333
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

import istr
from istr.models import create_model, freeze_batch_norm


def fitted_pca(mask_size: int = 28, dim: int = 60, n: int = 512, seed: int = 0) -> istr.MaskCodec:
    """A PCA-60 codec fitted on random ellipse grids (latency does not depend on what it learned)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, mask_size), torch.linspace(-1, 1, mask_size), indexing="ij")
    c = torch.rand(n, 4, generator=g)
    grids = ((xx - (c[:, 0, None, None] - 0.5)) ** 2 / (0.2 + c[:, 2, None, None]) ** 2
             + (yy - (c[:, 1, None, None] - 0.5)) ** 2 / (0.2 + c[:, 3, None, None]) ** 2 <= 1).float()
    return istr.create_codec("pca", mask_size=mask_size, dim=dim, whiten=True, logit_space=True).fit(grids)


def build_maskrcnn(device: torch.device) -> torch.nn.Module:
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, box_score_thresh=0.0, box_detections_per_img=100,
        min_size=800, max_size=1333)
    freeze_batch_norm(model.backbone.body)  # same frozen BN as ISTR's backbone
    return model.to(device).eval()


@torch.no_grad()
def calibrate_threshold(model: torch.nn.Module, image: torch.Tensor, candidates: int) -> float:
    """Score of the `candidates`-th best (proposal, foreground class) pair for this image."""
    captured = {}

    def keep_logits(module, inputs, outputs) -> None:
        captured["logits"] = outputs[0]

    hook = model.roi_heads.box_predictor.register_forward_hook(keep_logits)
    model.roi_heads.score_thresh = 0.0
    model([image])
    hook.remove()
    scores = torch.softmax(captured["logits"], -1)[:, 1:].flatten()
    k = min(candidates, scores.numel())
    return float(scores.topk(k).values[-1])


def markdown(result: dict) -> str:
    """A short markdown report of one run."""
    med, fps = result["median_s"], result["fps"]
    lines = ["# Inference latency: ISTR (istr_r50_fpn_pca60) and ISDA (isda_r50) vs Mask R-CNN R50-FPN", "",
             f"device {result['device']}, {result['threads']} thread(s), input {result['input'][0]}x{result['input'][1]}, "
             f"{result['dtype']}, batch 1, median of {result['repeats']} alternating runs, random weights, "
             f"torch {result['torch']}.", "",
             "| model | median (ms) | FPS | detections | mean box area / image |", "|---|---|---|---|---|"]
    for key, label in (("istr", "ISTR"), ("isda", "ISDA"), ("maskrcnn", "Mask R-CNN"),
                       ("backbone_fpn", "ResNet-50 + FPN alone")):
        if key not in med:
            continue
        det = result["detections"].get(key, {})
        lines.append(f"| {label} | {med[key] * 1000:.0f} | {fps[key]:.2f} | {det.get('detections', '-')} | "
                     f"{det.get('mean_box_area_fraction', '-')} |")
    isda = ""
    if "ratio_isda_over_maskrcnn" in result:
        by_round = result["ratio_isda_over_maskrcnn_by_round"]  # set with the ratio itself (main)
        isda = (f"; ISDA / Mask R-CNN: **{result['ratio_isda_over_maskrcnn']:.3f}** (round by round: median "
                f"{by_round['median']:.3f}, range {by_round['min']:.3f}-{by_round['max']:.3f})")
    lines += ["", f"Ratio ISTR / Mask R-CNN: **{result['ratio_istr_over_maskrcnn']:.3f}** (floor from the shared "
              f"backbone + FPN: {result['ratio_backbone_fpn_over_maskrcnn']:.3f}){isda}. Mask R-CNN box_score_thresh "
              f"{result['maskrcnn_box_score_thresh']:.4g} (calibrated; see the script's docstring); ISTR boxes: "
              f"{result['istr_boxes']}"
              + (f"; ISDA masks: {result['isda_masks']} (see the docstring)" if result.get("isda_masks") else "") + ".", ""]
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype (cuda)")
    parser.add_argument("--mrcnn-thresh", type=float, default=None,
                        help="Mask R-CNN box_score_thresh; default: calibrated to --candidates")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--istr-boxes", choices=["random", "whole"], default="random")
    parser.add_argument("--no-isda", action="store_true", help="leave ISDA (isda_r50) out")
    parser.add_argument("--isda-masks", choices=["all", "random"], default="all",
                        help="all: ISDA keeps its 100 detections (mask threshold 0); "
                             "random: those its random weights give")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here (+ .md beside it)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    image = torch.rand(3, args.height, args.width, device=device)
    istr_model = create_model("istr_r50_fpn_pca60", codec=fitted_pca()).to(device).eval()
    with torch.no_grad():
        for stage in istr_model.stages:  # zero box deltas: boxes stay the query boxes (see the docstring)
            stage.box_branch[-1].weight.zero_()
            stage.box_branch[-1].bias.zero_()
        if args.istr_boxes == "random":
            k = istr_model.num_queries
            istr_model.query_boxes.copy_(torch.cat([0.1 + 0.8 * torch.rand(k, 2), 0.05 + 0.45 * torch.rand(k, 2)], 1))
    mrcnn = build_maskrcnn(device)
    thresh = args.mrcnn_thresh if args.mrcnn_thresh is not None else calibrate_threshold(mrcnn, image, args.candidates)
    mrcnn.roi_heads.score_thresh = thresh
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(model) -> tuple[float, dict]:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            out = model([image])
        sync(device)
        seconds = time.perf_counter() - start
        boxes = out[0]["boxes"].float()
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean() / (args.height * args.width)
        return seconds, {"detections": len(boxes), "mean_box_area_fraction": round(float(area), 4)}

    def run_backbone(model) -> tuple[float, dict]:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            model.backbone(model.transform([image])[0])
        sync(device)
        return time.perf_counter() - start, {}

    runs = {"istr": lambda: run(istr_model), "maskrcnn": lambda: run(mrcnn),
            "backbone_fpn": lambda: run_backbone(istr_model)}
    if not args.no_isda:
        isda_model = create_model("isda_r50").to(device).eval()
        if args.isda_masks == "all":  # keep all its detections, as a trained model does (see the docstring)
            isda_model.mask_threshold = 0.0
        runs["isda"] = lambda: run(isda_model)
    times: dict[str, list[float]] = {k: [] for k in runs}
    dets = {}
    names = list(runs)
    for i in range(args.warmup + args.repeats):
        # alternate: all see the same machine load; the order rotates round by round, so that no model always runs
        # after the same one (what the one before leaves in the caches and the allocator moved a ratio by 2-5%)
        for name in names[i % len(names):] + names[:i % len(names)]:
            seconds, info = runs[name]()
            if info:
                dets[name] = info
            if i >= args.warmup:
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"device": str(device), "threads": torch.get_num_threads(), "input": [args.height, args.width],
              "dtype": args.dtype, "repeats": args.repeats, "maskrcnn_box_score_thresh": thresh, "istr_boxes": args.istr_boxes,
              "isda_masks": None if args.no_isda else args.isda_masks,
              "detections": dets, "median_s": med, "all_s": times, "ratio_istr_over_maskrcnn": med["istr"] / med["maskrcnn"],
              "ratio_backbone_fpn_over_maskrcnn": med["backbone_fpn"] / med["maskrcnn"],
              "fps": {k: 1.0 / v for k, v in med.items()}, "torch": torch.__version__}
    if "isda" in med:
        result["ratio_isda_over_maskrcnn"] = med["isda"] / med["maskrcnn"]
        paired = sorted(a / b for a, b in zip(times["isda"], times["maskrcnn"]))  # round by round: the load they shared
        result["ratio_isda_over_maskrcnn_by_round"] = {"median": statistics.median(paired), "min": paired[0],
                                                        "max": paired[-1]}
    print(f"device {device}, threads {result['threads']}, input {args.height}x{args.width}, {args.dtype}, "
          f"{args.repeats} repeats (+{args.warmup} warm-up), alternating")
    print(f"Mask R-CNN box_score_thresh {thresh:.5g}; ISTR {dets['istr']}; Mask R-CNN {dets['maskrcnn']}"
          + (f"; ISDA {dets['isda']}" if "isda" in dets else ""))
    for k in med:
        print(f"{k:>12}: median {med[k] * 1000:8.1f} ms  ({result['fps'][k]:.2f} FPS)  runs "
              + " ".join(f"{t * 1000:.0f}" for t in times[k]))
    print(f"ratio ISTR / Mask R-CNN = {result['ratio_istr_over_maskrcnn']:.3f}  (floor set by the shared "
          f"ResNet-50 + FPN alone: {med['backbone_fpn'] / med['maskrcnn']:.3f})"
          + (f"; ISDA / Mask R-CNN = {result['ratio_isda_over_maskrcnn']:.3f}" if "isda" in med else ""))
    if "isda" in med:
        by_round = result["ratio_isda_over_maskrcnn_by_round"]
        print(f"ISDA / Mask R-CNN round by round: median {by_round['median']:.3f}, "
              f"range {by_round['min']:.3f}-{by_round['max']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
