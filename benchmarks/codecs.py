"""Mask codec benchmark: fit codecs on one COCO json's masks, score reconstructions pasted back on another's.

Protocol (per non-crowd instance of the eval json): crop the full-resolution GT mask by its GT box to M x M
with istr.ops.crop_masks (roi_align, aligned; soft grid) -> encode -> decode -> istr.ops.paste_masks
(bilinear) into the GT box at full image resolution -> threshold 0.5 -> foreground IoU with the GT mask.
Reported per codec, M and l: mean / median / 10th percentile IoU, mean IoU by COCO size (small < 32^2 <=
medium < 96^2 <= large), mean IoU without the eval json's `person_only` images, the "oracle mask AP" (every GT
mask replaced by its reconstruction as a detection of its class with score 1, scored by pycocotools COCOeval
segm on the eval json), encode / decode throughput and fit time. Writes codecs.json, codecs.md and plots.

    python benchmarks/codecs.py --fit-json A.json --eval-json B.json \
        --codecs pca,pca_meinst,dct,identity,autoencoder --dims 20,40,60,80,120 --mask-sizes 28 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import istr
from istr.ops import crop_masks, paste_masks

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "coco_masks_pool"
# codec name in the benchmark -> (registered codec, constructor kwargs)
CODEC_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "pca": ("pca", {}),
    "pca_meinst": ("pca", {"whiten": True, "logit_space": True}),  # ISTR v1 / MEInst preprocessing
    "dct": ("dct", {}),
    "identity": ("identity", {}),
    "autoencoder": ("autoencoder", {}),
}


def quiet(fn, *args, **kwargs):
    """Call a pycocotools function that prints progress, without the prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_instances(ann_file: str, mask_sizes: list[int], keep_rles: bool) -> dict[str, Any]:
    """Rasterise every non-crowd instance once and crop it to each M (the run's cache).

    Returns {"coco", "anns", "grids": {M: float [N, M, M]}, "boxes" [N, 4] xyxy, "areas" [N],
    "person_only" bool [N], "rles" (keep_rles) list of GT RLEs, "image_sizes" list of (H, W)}.
    """
    coco = quiet(COCO, ann_file)
    anns, grids, boxes, person_only, rles, sizes = [], {m: [] for m in mask_sizes}, [], [], [], []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        h, w = img["height"], img["width"]
        image_anns = [a for a in coco.imgToAnns[img_id] if not a.get("iscrowd", 0)]
        if not image_anns:
            continue
        full = torch.from_numpy(np.stack([coco.annToMask(a) for a in image_anns]))
        b = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in image_anns], dtype=torch.float32)
        for m in mask_sizes:
            grids[m].append(crop_masks(full, b, m))
        if keep_rles:
            rles += [coco.annToRLE(a) for a in image_anns]
        anns += image_anns
        boxes.append(b)
        person_only += [img.get("annotated_classes") == "person_only"] * len(image_anns)
        sizes += [(h, w)] * len(image_anns)
    return {"coco": coco, "anns": anns, "grids": {m: torch.cat(g) for m, g in grids.items()},
            "boxes": torch.cat(boxes), "areas": np.array([a["area"] for a in anns], dtype=np.float64),
            "person_only": np.array(person_only, dtype=bool), "rles": rles, "image_sizes": sizes}


def paste_to_rles(recon: torch.Tensor, data: dict[str, Any]) -> list[dict]:
    """Paste reconstructions [N, M, M] into their GT boxes (threshold 0.5) -> one COCO RLE per instance.

    Each grid is pasted with istr.ops.paste_masks into the small window of pixels that can see its box (the
    same pixels paste_masks samples on the full image), then copied into a zero uint8 full-image canvas in
    Fortran order for pycocotools: no N x H x W float tensors.
    """
    out: list[dict] = []
    for grid, box, (h, w) in zip(recon, data["boxes"].tolist(), data["image_sizes"]):
        x0, y0, x1, y1 = box
        px0, px1 = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, w)
        py0, py1 = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, h)
        canvas = np.zeros((h, w), dtype=np.uint8, order="F")
        if px1 > px0 and py1 > py0:
            local = torch.tensor([[x0 - px0, y0 - py0, x1 - px0, y1 - py0]])
            patch = paste_masks(grid[None], local, (py1 - py0, px1 - px0), threshold=0.5)[0]
            canvas[py0:py1, px0:px1] = patch.numpy()
        out.append(mask_utils.encode(canvas))
    return out


def iou_stats(ious: np.ndarray, data: dict[str, Any]) -> dict[str, float]:
    areas = data["areas"]
    stats = {"mean_iou": float(ious.mean()), "median_iou": float(np.median(ious)),
             "p10_iou": float(np.percentile(ious, 10)), "n": int(ious.size)}
    for name, sel in (("small", areas < 32 ** 2), ("medium", (areas >= 32 ** 2) & (areas < 96 ** 2)),
                      ("large", areas >= 96 ** 2)):
        stats[f"mean_iou_{name}"] = float(ious[sel].mean()) if sel.any() else float("nan")
        stats[f"n_{name}"] = int(sel.sum())
    keep = ~data["person_only"]
    stats["mean_iou_no_person_only"] = float(ious[keep].mean()) if keep.any() else float("nan")
    stats["median_iou_no_person_only"] = float(np.median(ious[keep])) if keep.any() else float("nan")
    stats["n_no_person_only"] = int(keep.sum())
    return stats


def oracle_mask_ap(rles: list[dict], data: dict[str, Any]) -> dict[str, float]:
    """COCOeval segm AP of the reconstructions as detections (score 1), on all images and on 'all'-class images."""
    coco = data["coco"]
    all_class_imgs = [i for i, img in coco.imgs.items() if img.get("annotated_classes", "all") != "person_only"]
    # loadRes adds fields to the dicts it gets: build fresh ones
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "segmentation": {"size": r["size"], "counts": r["counts"]}} for a, r in zip(data["anns"], rles)]
    ev = COCOeval(coco, quiet(coco.loadRes, dets), "segm")
    ev.params.imgIds = sorted(coco.imgs)
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]  # AP by object size is not reported: skip it
    ev.params.maxDets = [100]
    quiet(ev.evaluate)
    out = {}
    all_ids = list(ev._paramsEval.imgIds)  # sorted by evaluate()
    n_area, position = len(ev._paramsEval.areaRng), {img_id: i for i, img_id in enumerate(all_ids)}
    for key, img_ids in (("", all_ids), ("_all_class_images", sorted(all_class_imgs))):
        if not img_ids:
            continue
        # evaluate once, accumulate per image subset: pycocotools' accumulate indexes evalImgs by positions in
        # params.imgIds, so give it the subset's own evalImgs (layout: category, area range, image)
        sub = copy.copy(ev)
        sub.params, sub._paramsEval = copy.deepcopy(ev.params), copy.deepcopy(ev._paramsEval)
        sub.params.imgIds = sub._paramsEval.imgIds = img_ids
        sub.evalImgs = [ev.evalImgs[(k * n_area + a) * len(all_ids) + position[i]]
                        for k in range(len(ev._paramsEval.catIds)) for a in range(n_area) for i in img_ids]
        quiet(sub.accumulate)
        precision = sub.eval["precision"][..., 0, 0]  # [T iou thresholds, R recalls, K categories]
        for name, p in (("", precision), ("50", precision[:1]), ("75", precision[5:6])):
            valid = p[p > -1]  # COCOeval.summarize: categories without GT are -1
            out[f"oracle_ap{name}{key}"] = float(valid.mean()) if valid.size else float("nan")
    return out


def throughput(codec: istr.MaskCodec, grids: torch.Tensor, batch: int = 1024) -> tuple[float, float, torch.Tensor]:
    """(encode masks/s, decode masks/s, reconstructions [N, M, M]) over all grids, batches of `batch`."""
    with torch.no_grad():
        codec.encode(grids[:8])  # warm-up
        t0 = time.perf_counter()
        z = torch.cat([codec.encode(grids[i : i + batch]) for i in range(0, len(grids), batch)])
        t1 = time.perf_counter()
        recon = torch.cat([codec.decode(z[i : i + batch]) for i in range(0, len(z), batch)])
        t2 = time.perf_counter()
    return len(grids) / max(t1 - t0, 1e-9), len(grids) / max(t2 - t1, 1e-9), recon


def pca_energy(grids: torch.Tensor, k: int = 100) -> dict[str, list[float]]:
    """Explained-variance ratio of the top-k plain-PCA components (the paper's Fig. 1)."""
    m = grids.shape[-1]
    k = min(k, m * m)
    codec = istr.create_codec("pca", mask_size=m, dim=k).fit(grids)
    total = float(grids.reshape(len(grids), -1).double().var(0).sum())
    ratio = (codec.explained_variance.double() / total).tolist()
    return {"ratio": ratio, "cumulative": np.cumsum(ratio).tolist()}


def make_plots(results: list[dict], energy: dict[int, dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for m, e in energy.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        idx = np.arange(1, len(e["ratio"]) + 1)
        ax.bar(idx, e["ratio"], color="tab:blue", label="explained variance ratio")
        ax.set_xlabel("principal component")
        ax.set_ylabel("energy (variance ratio)")
        ax2 = ax.twinx()
        ax2.plot(idx, e["cumulative"], color="tab:red", label="cumulative")
        ax2.set_ylabel("cumulative", color="tab:red")
        ax2.set_ylim(0, 1)
        ax.set_title(f"PCA energy of the top-{len(idx)} components (M={m}, fit masks)")
        fig.tight_layout()
        path = out / f"codecs_fig1_pca_energy_M{m}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    for m in sorted({r["mask_size"] for r in results}):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        rows = [r for r in results if r["mask_size"] == m]
        for name in dict.fromkeys(r["codec"] for r in rows):
            pts = sorted((r["dim"], r["mean_iou"]) for r in rows if r["codec"] == name)
            if name == "identity":
                ax.axhline(pts[0][1], ls="--", color="gray", label=f"identity (l={pts[0][0]})")
            else:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("embedding dim l")
        ax.set_ylabel("mean IoU (pasted, full res)")
        ax.set_title(f"Reconstruction IoU vs l (M={m})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"codecs_iou_vs_dim_M{m}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Mask codec benchmark", "",
        f"Fit: `{s['fit_json']}` ({report['n_fit']} non-crowd masks). Eval: `{s['eval_json']}` "
        f"({report['n_eval']} non-crowd masks; {report['n_eval_no_person_only']} outside `person_only` images).",
        f"Machine: {s['machine']}; torch {s['torch']}, {s['threads']} threads. Total run time {report['total_s']:.0f} s.",
        "", f"Protocol: GT box crop (roi_align, aligned; binarize grids: {s['binarize']}) -> encode -> decode -> "
        "bilinear paste into the GT box at full resolution -> threshold 0.5 -> IoU with the full-resolution GT mask. Oracle AP: each GT mask replaced by its "
        "reconstruction (score 1), COCOeval segm on the eval json (all images / `all`-class images only).", "",
        "| codec | M | l | mean IoU | median | p10 | small | medium | large | mean IoU w/o person_only "
        "| oracle AP | oracle AP (all-class imgs) | encode masks/s | decode masks/s | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['codec']} | {r['mask_size']} | {r['dim']} | {r['mean_iou']:.4f} | {r['median_iou']:.4f} "
            f"| {r['p10_iou']:.4f} | {r['mean_iou_small']:.4f} | {r['mean_iou_medium']:.4f} | {r['mean_iou_large']:.4f} "
            f"| {r['mean_iou_no_person_only']:.4f} | {r.get('oracle_ap', float('nan')):.4f} "
            f"| {r.get('oracle_ap_all_class_images', float('nan')):.4f} | {r['encode_per_s']:.0f} "
            f"| {r['decode_per_s']:.0f} | {r['fit_s']:.1f} |")
    lines += ["", f"Instances by size in the eval set: small {report['n_small']}, medium {report['n_medium']}, "
              f"large {report['n_large']}.", ""]
    if report.get("plots"):
        lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]), ""]
    if report.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit-json", default=str(POOL / "instances_pool_train2017.json"))
    p.add_argument("--eval-json", default=str(POOL / "instances_pool_val2017.json"))
    p.add_argument("--codecs", default="pca,pca_meinst,dct,identity,autoencoder",
                   help=f"comma list of {sorted(CODEC_SPECS)}")
    p.add_argument("--dims", default="20,40,60,80,120", help="embedding dims l for pca / pca_meinst / dct")
    p.add_argument("--ae-dims", default="60", help="dims for the autoencoder (each is a separate training run)")
    p.add_argument("--mask-sizes", default="28")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (on a 2-core machine shared with other jobs, 2 threads trained the "
                        "autoencoder ~10x slower than 1: measured 46.7 vs 4.2 s per epoch)")
    p.add_argument("--ae-epochs", type=int, default=None, help="override the autoencoder's default epochs")
    p.add_argument("--ae-device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--binarize", choices=["none", "fit", "all"], default="none",
                   help="threshold grids at 0.5 before fitting ('fit') or before fitting and encoding ('all')")
    p.add_argument("--no-ap", action="store_true", help="skip the oracle mask AP (COCOeval)")
    p.add_argument("--progress", action="store_true", help="tqdm bars while fitting the autoencoder")
    p.add_argument("--machine", default="2-core CPU dev machine (shared with other jobs)")
    p.add_argument("--note", action="append", default=[], help="a remark for the markdown report (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = [c for c in codecs if c not in CODEC_SPECS]
    if unknown:
        raise SystemExit(f"unknown codecs {unknown}; choose from {sorted(CODEC_SPECS)}")
    dims = [int(d) for d in args.dims.split(",")]
    ae_dims = [int(d) for d in args.ae_dims.split(",")]
    mask_sizes = [int(m) for m in args.mask_sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    fit_data = load_instances(args.fit_json, mask_sizes, keep_rles=False)
    eval_data = load_instances(args.eval_json, mask_sizes, keep_rles=True)
    print(f"loaded {len(fit_data['anns'])} fit / {len(eval_data['anns'])} eval masks in {time.perf_counter() - t0:.1f} s",
          flush=True)

    results, energy = [], {}
    for m in mask_sizes:
        fit_grids, eval_grids = fit_data["grids"][m], eval_data["grids"][m]
        if args.binarize in ("fit", "all"):
            fit_grids = (fit_grids >= 0.5).float()
        if args.binarize == "all":
            eval_grids = (eval_grids >= 0.5).float()
        energy[m] = pca_energy(fit_grids)
        for name in codecs:
            registered, kwargs = CODEC_SPECS[name]
            if name == "identity":
                codec_dims = [m * m]
            elif name == "autoencoder":
                codec_dims = ae_dims
            else:
                codec_dims = dims
            for dim in codec_dims:
                if dim > m * m:
                    continue
                codec = istr.create_codec(registered, mask_size=m, dim=dim, **kwargs)
                fit_kwargs: dict[str, Any] = {}
                if name == "autoencoder":
                    fit_kwargs = {"seed": args.seed, "device": args.ae_device, "progress": args.progress}
                    if args.ae_epochs is not None:
                        fit_kwargs["epochs"] = args.ae_epochs
                t = time.perf_counter()
                codec.fit(fit_grids, **fit_kwargs)
                fit_s = time.perf_counter() - t
                enc_s, dec_s, recon = throughput(codec, eval_grids)
                rles = paste_to_rles(recon, eval_data)
                ious = np.array([mask_utils.iou([d], [g], [0])[0, 0] for d, g in zip(rles, eval_data["rles"])])
                row = {"codec": name, "registered_codec": registered, "config": codec.config(), "mask_size": m,
                       "dim": dim, **iou_stats(ious, eval_data), "encode_per_s": enc_s, "decode_per_s": dec_s,
                       "fit_s": fit_s}
                if not args.no_ap:
                    row.update(oracle_mask_ap(rles, eval_data))
                results.append(row)
                print(f"{name:12s} M={m} l={dim:4d} mean IoU {row['mean_iou']:.4f} (w/o person_only "
                      f"{row['mean_iou_no_person_only']:.4f}) AP {row.get('oracle_ap', float('nan')):.4f} "
                      f"fit {fit_s:.1f} s  [{time.perf_counter() - t_start:.0f} s]", flush=True)

    areas = eval_data["areas"]
    report = {
        "settings": {**vars(args), "torch": torch.__version__, "python": platform.python_version(),
                     "argv": sys.argv[1:] if argv is None else argv},
        "n_fit": len(fit_data["anns"]), "n_eval": len(eval_data["anns"]),
        "n_eval_no_person_only": int((~eval_data["person_only"]).sum()),
        "n_small": int((areas < 32 ** 2).sum()), "n_medium": int(((areas >= 32 ** 2) & (areas < 96 ** 2)).sum()),
        "n_large": int((areas >= 96 ** 2).sum()),
        "results": results, "pca_energy": {str(m): e for m, e in energy.items()},
        "notes": list(args.note),
    }
    report["plots"] = make_plots(results, energy, out)
    report["total_s"] = time.perf_counter() - t_start
    (out / "codecs.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    (out / "codecs.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
