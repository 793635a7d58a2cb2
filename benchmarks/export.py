"""Exported models on CPU: eager vs onnxruntime latency (1 and 2 threads), and a trained demo model's AP eager vs ONNX.

latency: each preset is exported to ONNX (istr.export.export, dynamic sizes) and timed on one image, eager
(predict: model([image]), the full inference including the paste at the original size) against
istr.export.OnnxPredictor (host resize + onnxruntime + the same host-side paste/resize), alternating run by run,
median of --repeats. Tiny presets on a 320x480 image, R50 presets (istr_r50_fpn_pca60, isda_r50) on 800x1216.
Random weights as benchmarks/speed.py sets them (ISTR: last box layers zeroed, random object-like query boxes,
so that all 100 detections are kept and pasted; a PCA-60 codec fitted on random ellipses). The R50 rows run only
when the 1-minute load average is below --max-load (the machine is shared), else they are listed as skipped.

parity: eager vs onnxruntime on one image per preset (random weights as above; R50 presets at 800x1216): the
tests' criteria (labels, scores, boxes, mask pixels) measured at full size.

ap: a short demo run (istr.demo.run_demo, --iters steps on --num-train images, 1 thread), its model exported to
ONNX, and istr.engine.evaluate on the demo's validation set, eager and through OnnxPredictor.as_module().

  python benchmarks/export.py latency --repeats 5 [--skip-r50]
  python benchmarks/export.py ap --iters 60 --num-train 80 --num-val 20
  python benchmarks/export.py parity --models istr_r50_fpn_pca60 isda_r50
Both merge their rows into benchmarks/results/export_cpu.{json,md} (--out to write elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import istr
from istr.export import OnnxPredictor, export
from speed import fitted_pca  # benchmarks/speed.py, beside this script: the same codec as its latency runs

RESULTS = Path(__file__).resolve().parent / "results" / "export_cpu"


def build(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if preset.startswith("istr"):
        model = istr.create_model(preset, codec=fitted_pca())
        with torch.no_grad():  # as benchmarks/speed.py: boxes stay the (random, object-like) query boxes
            g = torch.Generator().manual_seed(0)
            q = model.num_queries
            model.query_boxes.copy_(torch.cat([torch.rand(q, 2, generator=g), 0.05 + 0.45 * torch.rand(q, 2, generator=g)], 1))
            for stage in model.stages:
                stage.box_branch[-1].weight.zero_()
                stage.box_branch[-1].bias.zero_()
    else:
        model = istr.create_model(preset)
    return model.eval()


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


def load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


@torch.no_grad()
def latency(args: argparse.Namespace) -> dict:
    rows, work = [], Path(tempfile.mkdtemp(prefix="istr_export_bench_"))
    cases = [("istr_tiny", (320, 480)), ("isda_tiny", (320, 480))]
    if not args.skip_r50:
        cases += [("istr_r50_fpn_pca60", (800, 1216)), ("isda_r50", (800, 1216))]
    for preset, (h, w) in cases:
        if "r50" in preset and (load() or 0) > args.max_load and not args.force:
            rows.append({"preset": preset, "image": f"{h}x{w}", "skipped": f"load average {load()} > {args.max_load}"})
            print(f"{preset}: skipped (load average {load()})")
            continue
        torch.set_num_threads(1)
        model = build(preset)
        t = time.perf_counter()
        path = export(model, work / f"{preset}.onnx", format="onnx")
        export_s = round(time.perf_counter() - t, 1)
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            predictor = OnnxPredictor(path, threads=threads)
            eager = lambda: model([image])  # noqa: E731
            onnx = lambda: predictor(image)  # noqa: E731
            eager(), onnx()  # warm up
            load_before = load()
            e_ms, o_ms = [], []
            for _ in range(args.repeats):  # alternate, so both see the same load
                e_ms.append(median_ms(eager, 1))
                o_ms.append(median_ms(onnx, 1))
            got, want = predictor(image), model([image])[0]
            row = {"preset": preset, "image": f"{h}x{w}", "threads": threads, "eager_ms": statistics.median(e_ms),
                   "onnxruntime_ms": statistics.median(o_ms), "export_s": export_s,
                   "onnx_mb": round(path.stat().st_size / 2 ** 20, 1), "detections": len(want["scores"]),
                   "same_detections": bool(len(got["scores"]) == len(want["scores"])
                                           and torch.equal(got["labels"], want["labels"])),
                   "load_average": [load_before, load()]}
            row["ratio"] = round(row["onnxruntime_ms"] / row["eager_ms"], 2)
            rows.append(row)
            print(json.dumps(row))
        path.unlink()
    return {"latency": rows}


@torch.no_grad()
def parity(args: argparse.Namespace) -> dict:
    """Eager vs onnxruntime on one image per preset (random weights as in latency), the tests' criteria measured."""
    rows, work = [], Path(tempfile.mkdtemp(prefix="istr_export_parity_"))
    torch.set_num_threads(1)
    for preset in args.models:
        h, w = (800, 1216) if "r50" in preset else (320, 480)
        model = build(preset)
        path = export(model, work / f"{preset}.onnx", format="onnx")
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(1))
        got, want = OnnxPredictor(path, threads=1)(image), model([image])[0]
        same = len(got["labels"]) == len(want["labels"]) and torch.equal(got["labels"], want["labels"])
        row = {"preset": preset, "image": f"{h}x{w}", "detections": len(want["labels"]), "same_labels": bool(same)}
        if same:
            row.update({"max_score_diff": float((got["scores"] - want["scores"]).abs().max()),
                        "max_box_diff_px": float((got["boxes"] - want["boxes"]).abs().max()),
                        "mask_pixels_differing": float(((got["masks"] >= 0.5) != (want["masks"] >= 0.5)).float().mean()),
                        "max_mask_diff": float((got["masks"] - want["masks"]).abs().max())})
        row["load_average"] = load()
        rows.append(row)
        print(json.dumps(row))
        path.unlink()
    return {"parity": rows}


def ap(args: argparse.Namespace) -> dict:
    from istr.data.coco import CocoInstances
    from istr.demo import run_demo
    from istr.engine.evaluate import evaluate

    torch.set_num_threads(1)
    rows = []
    for preset in args.models:
        out = Path(tempfile.mkdtemp(prefix=f"istr_export_ap_{preset}_"))
        run_demo(out, iters=args.iters, num_train=args.num_train, num_val=args.num_val, threads=1, model=preset,
                 progress=False, overlays=0)
        model = istr.load_model(out / "model.safetensors").eval()
        record = json.loads((out / "run.json").read_text())
        val = CocoInstances(record["val_images"], record["val_ann"], include_empty=True)
        path = export(model, out / "model.onnx", format="onnx")
        t = time.perf_counter()
        eager = evaluate(model, val, progress=False)
        t_eager = time.perf_counter() - t
        t = time.perf_counter()
        onnx = evaluate(OnnxPredictor(path, threads=1).as_module(), val, progress=False)
        t_onnx = time.perf_counter() - t
        row = {"preset": preset, "iters": args.iters, "num_train": args.num_train, "num_val": args.num_val,
               "eager": {k: round(100 * eager[k]["AP"], 2) for k in ("segm", "bbox")},
               "onnxruntime": {k: round(100 * onnx[k]["AP"], 2) for k in ("segm", "bbox")},
               "eval_s": {"eager": round(t_eager, 1), "onnxruntime": round(t_onnx, 1)}}
        row["abs_diff"] = {k: round(abs(row["eager"][k] - row["onnxruntime"][k]), 2) for k in ("segm", "bbox")}
        rows.append(row)
        print(json.dumps(row))
    return {"ap": rows}


def write(results: dict, out: Path) -> None:
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    merged = json.loads(json_path.read_text()) if json_path.exists() else {}
    if "ap" in results:  # AP rows accumulate over runs of other presets / budgets
        keep = {(r["preset"], r["iters"]) for r in results["ap"]}
        results = {"ap": [r for r in merged.get("ap", []) if (r["preset"], r["iters"]) not in keep] + results["ap"]}
    merged.update(results)
    merged["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                         "onnxruntime": __import__("onnxruntime").__version__}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(merged, indent=2))
    lines = ["# Exported models on CPU (benchmarks/export.py)", "",
             f"Machine: {merged['machine']['cpu_count']} CPU cores (shared), torch {merged['machine']['torch']}, "
             f"onnxruntime {merged['machine']['onnxruntime']}.", ""]
    if merged.get("latency"):
        lines += ["## Latency, one image, eager (model([image])) vs onnxruntime (OnnxPredictor: host resize + graph + "
                  "host paste), median", "",
                  "| preset | image | threads | eager ms | onnxruntime ms | ratio | same detections | load avg |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in merged["latency"]:
            if "skipped" in r:
                lines.append(f"| {r['preset']} | {r['image']} | - | skipped: {r['skipped']} | | | | |")
            else:
                lines.append(f"| {r['preset']} | {r['image']} | {r['threads']} | {r['eager_ms']} | "
                             f"{r['onnxruntime_ms']} | {r['ratio']} | {r['same_detections']} | "
                             f"{r['load_average'][0]} / {r['load_average'][1]} |")
        lines.append("")
    if merged.get("parity"):
        lines += ["## Parity on one image, random weights (eager vs onnxruntime through OnnxPredictor)", "",
                  "| preset | image | detections | same labels | max score diff | max box diff px | "
                  "mask pixels differing | load avg |", "|---|---|---|---|---|---|---|---|"]
        for r in merged["parity"]:
            num = lambda key: f"{r[key]:.2g}" if key in r else "-"  # noqa: E731
            lines.append(f"| {r['preset']} | {r['image']} | {r['detections']} | {r['same_labels']} | "
                         f"{num('max_score_diff')} | {num('max_box_diff_px')} | {num('mask_pixels_differing')} | "
                         f"{r['load_average']} |")
        lines.append("")
    if merged.get("ap"):
        lines += ["## A trained demo model: COCO AP on the demo's validation set, eager vs onnxruntime", "",
                  "| preset | steps | train / val images | mask AP eager | mask AP onnx | box AP eager | box AP onnx |",
                  "|---|---|---|---|---|---|---|"]
        for r in merged["ap"]:
            lines.append(f"| {r['preset']} | {r['iters']} | {r['num_train']} / {r['num_val']} | {r['eager']['segm']} | "
                         f"{r['onnxruntime']['segm']} | {r['eager']['bbox']} | {r['onnxruntime']['bbox']} |")
        lines.append("")
    md_path.write_text("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-r50", action="store_true")
    p.add_argument("--max-load", type=float, default=1.5, help="skip the R50 rows above this 1-minute load average")
    p.add_argument("--force", action="store_true", help="run the R50 rows whatever the load")
    p = sub.add_parser("ap")
    p.add_argument("--models", nargs="+", default=["istr_tiny", "isda_tiny"])
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--num-train", type=int, default=80)
    p.add_argument("--num-val", type=int, default=20)
    p = sub.add_parser("parity")
    p.add_argument("--models", nargs="+", default=["istr_r50_fpn_pca60", "isda_r50"])
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=RESULTS, help="results path without suffix")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    write({"latency": latency, "ap": ap, "parity": parity}[args.job](args), args.out)


if __name__ == "__main__":
    main()
