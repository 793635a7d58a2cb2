"""Where a trained demo model loses AP, per validation object (the first N images): the prediction with the best
mask IoU (its IoU, whether its class is right, its score), the top-scoring prediction overlapping the object
(IoU > 0.3: what COCO matching meets first), and false positives scored above 0.3 (duplicates of a found object
vs background). Works for any family. Behind the diagnosis tables of benchmarks/results/isda_demo_levers.md.

    python benchmarks/isda_diagnose.py runs/isda_levers/dec3 --images 100
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import istr
from istr.data import CocoInstances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a demo folder (model.safetensors, data/)")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = istr.load_model(args.run / "model.safetensors").eval()
    data = args.run / "data"
    val = CocoInstances(data / "val", data / "annotations" / "instances_val.json", include_empty=True)
    best_iou, best_right, best_score, top_iou, top_right, top_score = [], [], [], [], [], []
    duplicates = background = 0
    confusion: dict[tuple[int, int], int] = {}  # (true class, class of the top-scoring overlapping prediction) -> count
    with torch.no_grad():
        for i in range(min(args.images, len(val))):
            image, target = val[i]
            out = model([image])[0]
            gt = target["masks"].flatten(1).float()
            pred = (out["masks"] >= 0.5).flatten(1).float()  # binary (ISTR returns soft masks)
            if not len(gt):
                continue
            inter = gt @ pred.T
            iou = inter / (gt.sum(1)[:, None] + pred.sum(1)[None] - inter).clamp(min=1)
            best = iou.argmax(1) if len(pred) else None
            for g in range(len(gt)):
                if best is None:
                    for lst in (best_iou, best_right, best_score, top_iou, top_right, top_score):
                        lst.append(0.0)
                    continue
                k = int(best[g])
                best_iou.append(float(iou[g, k]))
                best_right.append(float(out["labels"][k] == target["labels"][g]))
                best_score.append(float(out["scores"][k]))
                near = torch.nonzero(iou[g] > 0.3).flatten()
                t = int(near[out["scores"][near].argmax()]) if len(near) else k
                top_iou.append(float(iou[g, t]) if len(near) else 0.0)
                top_right.append(float(out["labels"][t] == target["labels"][g]) if len(near) else 0.0)
                top_score.append(float(out["scores"][t]) if len(near) else 0.0)
                if len(near):
                    pair = (int(target["labels"][g]), int(out["labels"][t]))
                    confusion[pair] = confusion.get(pair, 0) + 1
            found = set(best.tolist()) if best is not None else set()
            for k in range(len(pred)):
                if out["scores"][k] >= 0.3 and k not in found:
                    if float(iou[:, k].max()) >= 0.5:
                        duplicates += 1
                    else:
                        background += 1
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    share = lambda xs, v: sum(x > v for x in xs) / max(len(xs), 1)  # noqa: E731
    print(f"{args.run}: {len(best_iou)} objects")
    print(f"  best-mask prediction: IoU {mean(best_iou):.3f} (> 0.75: {share(best_iou, 0.75):.2f}, > 0.9: "
          f"{share(best_iou, 0.9):.2f}), class right {mean(best_right):.2f}, score {mean(best_score):.2f}")
    print(f"  top-scoring overlapping prediction: IoU {mean(top_iou):.3f} (> 0.75: {share(top_iou, 0.75):.2f}), "
          f"class right {mean(top_right):.2f}, score {mean(top_score):.2f}")
    print(f"  false positives scored >= 0.3: {duplicates} duplicates of an object, {background} on background")
    names = val.category_names
    wrong = sorted(((n, t, p) for (t, p), n in confusion.items() if t != p), reverse=True)
    print("  top-scoring prediction's class wrong (true -> predicted: objects): " + (", ".join(
        f"{names[t]} -> {names[p]}: {n}" for n, t, p in wrong) or "none"))


if __name__ == "__main__":
    main()
