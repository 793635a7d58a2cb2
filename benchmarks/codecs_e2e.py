"""Codecs compared end to end: the demo's ISTR trained with each mask codec on the same data and budget.

    python benchmarks/codecs_e2e.py --seeds 0 1 --jobs 2 --threads 1            # ~62 min on 2 CPU cores
    python benchmarks/codecs_e2e.py --name ablations_e2e --variants pca60 cost_none cost_dice cost_embed_l1 \
        attn_multihead                                                           # paper Table 1b / 1d rows
    python benchmarks/codecs_e2e.py --name ablations_1c_1e --variants pca60 loss_dice loss_l2 pool_max pool_avg \
        pos_only                                                                 # paper Table 1c / 1e rows

Each variant is the demo (istr.demo: easy synthetic shapes, istr_tiny, its training settings and iteration budget)
with one change, a one-line dict in VARIANTS: the codec (Table 1a: PCA-60 as in ISTR v1, a learned autoencoder-60,
DCT-60, identity-784, each fitted on the training masks) or the matching cost (1b), the loss terms (1c), the
attention (1d) or the initial queries' image pooling and position embeddings (1e). Each run
is its own process (--jobs at a time); the table gives mask AP, AP50, AP75 and box AP per seed, and the codec's
reconstruction IoU on the validation masks (the ceiling of mask quality). A difference between two variants is
called beyond the seed spread when their per-seed ranges of mask AP do not overlap. Runs whose row is already in
--work are not run again (so variants can be added to an earlier run). Writes benchmarks/results/NAME.{json,md,png}
(--name, default codecs_e2e).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# name -> overrides of the demo: {"codec": (registered name, kwargs)} and/or {"model": {create_model keywords}}
VARIANTS: dict[str, dict[str, Any]] = {
    "pca60": {"codec": ("pca", {"mask_size": 28, "dim": 60, "whiten": True, "logit_space": True})},
    "ae60": {"codec": ("autoencoder", {"mask_size": 28, "dim": 60})},
    "dct60": {"codec": ("dct", {"mask_size": 28, "dim": 60})},
    "identity784": {"codec": ("identity", {"mask_size": 28})},
    # paper Table 1b (mask matching cost; pca60 is the paper's cosine cost) and 1d (attention), on the PCA-60 model
    "cost_none": {"model": {"costs": {"focal": 2, "l1": 5, "giou": 2}}},
    "cost_embed_l1": {"model": {"costs": {"focal": 2, "l1": 5, "giou": 2, "embed_l1": 2}}},
    "cost_dice": {"model": {"costs": {"focal": 2, "l1": 5, "giou": 2, "dice": 2}}},
    "attn_multihead": {"model": {"attention": "multihead"}},
    # Table 1c (loss terms; pca60 is the paper's L2 + dice): dice only, the embedding L2 only
    "loss_dice": {"model": {"losses": {"focal": 2, "l1": 5, "giou": 2, "dice": 2}}},
    "loss_l2": {"model": {"losses": {"focal": 2, "l1": 5, "giou": 2, "embed_l2": 2}}},
    # Table 1e (the initial queries; pca60 is the paper's image average pooling + position embeddings)
    "pool_max": {"model": {"image_pool": "max", "position_embedding": False}},
    "pool_avg": {"model": {"image_pool": "avg", "position_embedding": False}},
    "pos_only": {"model": {"image_pool": None, "position_embedding": True}},
}
CODEC_VARIANTS = ["pca60", "ae60", "dct60", "identity784"]
PRESET = "istr_tiny"  # every row is this preset with its demo settings (istr.demo.demo_settings) and one change


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one variant in this process; returns its row."""
    import torch

    import istr
    from istr.demo import DEMO_DATA, build_demo_model, demo_settings, demo_train_config
    from istr.engine import Trainer, coco_mask_grids, evaluate

    torch.set_num_threads(args.threads)
    spec = {"codec": VARIANTS["pca60"]["codec"], **VARIANTS[name]}
    data_cfg = DEMO_DATA["easy"]
    data_dir = Path(args.work) / "data_easy"
    if not (data_dir / "done").is_file():
        raise RuntimeError(f"{data_dir} was not generated")
    train_ann, val_ann = data_dir / "annotations" / "instances_train.json", data_dir / "annotations" / "instances_val.json"
    codec_name, codec_kwargs = spec["codec"]
    codec = istr.create_codec(codec_name, **codec_kwargs)
    t0 = time.perf_counter()
    grids = coco_mask_grids(train_ann, codec.mask_size)
    torch.manual_seed(seed)
    fit_kwargs = {"progress": False, "seed": seed} if codec_name == "autoencoder" else {}
    codec.fit(grids, **fit_kwargs)
    fit_seconds = time.perf_counter() - t0
    recon_iou = codec.reconstruction_iou(coco_mask_grids(val_ann, codec.mask_size))
    size = data_cfg["image_size"]
    train = demo_settings(PRESET)["train"]
    model_cfg = {"codec": codec, "min_size": size, "max_size": size, **spec.get("model", {})}
    model, train_set, val_set = build_demo_model(data_dir, PRESET, model_cfg, train["flip"], seed)
    iters = args.iters or train["iters"]
    cfg = demo_train_config(train, iters, seed=seed, checkpoint_every=0, log_every=50, progress=False, device="cpu",
                            eval_at_end=False)
    result = Trainer(model, train_set, cfg, out_dir=Path(args.work) / f"{name}_s{seed}", overwrite=True).train()
    metrics = evaluate(model, val_set, progress=False)
    return {"variant": name, "seed": seed, "codec": {"name": codec_name, **codec_kwargs},
            "model_overrides": spec.get("model", {}), "mask_AP": metrics["segm"]["AP"],
            "mask_AP50": metrics["segm"]["AP50"], "mask_AP75": metrics["segm"]["AP75"], "box_AP": metrics["bbox"]["AP"],
            "reconstruction_iou": recon_iou, "codec_fit_seconds": round(fit_seconds, 1),
            "iterations": result.iterations, "seconds_per_iter": round(result.elapsed_s / max(result.iterations, 1), 3)}


def spread_table(rows: list[dict[str, Any]], names: list[str]) -> tuple[list[str], list[str]]:
    """Markdown rows (mean and per-seed values) and the pairs whose mask AP ranges over seeds do not overlap."""
    by = {n: [r for r in rows if r["variant"] == n] for n in names}
    lines = []
    for n in names:
        rs = by[n]
        if not rs:
            continue
        cell = lambda key: f"{100 * sum(r[key] for r in rs) / len(rs):.1f} ({', '.join(f'{100 * r[key]:.1f}' for r in rs)})"  # noqa: E731
        lines.append(f"| {n} | {cell('mask_AP')} | {cell('mask_AP50')} | {cell('mask_AP75')} | {cell('box_AP')} | "
                     f"{rs[0]['reconstruction_iou']:.3f} |")
    beyond = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = [r["mask_AP"] for r in by[a]], [r["mask_AP"] for r in by[b]]
            if ra and rb and (min(ra) > max(rb) or min(rb) > max(ra)):
                hi, lo = (a, b) if min(ra) > max(rb) else (b, a)
                beyond.append(f"{hi} > {lo}")
    return lines, beyond


def plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    for i, n in enumerate(names):
        rs = [r for r in rows if r["variant"] == n]
        if not rs:
            continue
        ax.bar(i, 100 * sum(r["mask_AP"] for r in rs) / len(rs), color="C0", alpha=0.5)
        ax.scatter([i] * len(rs), [100 * r["mask_AP"] for r in rs], color="C0", zorder=3, label="seeds" if i == 0 else None)
        ax.scatter(i, 100 * rs[0]["reconstruction_iou"], marker="_", s=600, color="C3",
                   label="codec reconstruction IoU x 100" if i == 0 else None)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="mask AP (%)", title="ISTR (istr_tiny, demo budget) per variant")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=CODEC_VARIANTS, help=f"from {list(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=None, help="training steps (default: the demo's)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each with --threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/codecs_e2e")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="codecs_e2e", help="stem of the files written in --out")
    p.add_argument("--report", action="store_true", help="only write the table from the runs already in --work")
    p.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    work = Path(args.work)
    if args.one:
        row = run_one(args.one[0], int(args.one[1]), args)
        (work / f"{args.one[0]}_s{args.one[1]}.json").write_text(json.dumps(row, indent=1))
        return
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    from istr.data import make_synthetic_coco
    from istr.demo import DEMO_DATA, demo_settings, machine_info

    demo = demo_settings(PRESET)

    data_dir = work / "data_easy"
    if not (data_dir / "done").is_file():
        make_synthetic_coco(data_dir, **DEMO_DATA["easy"])
        (data_dir / "done").write_text("1")
    iters = args.iters or demo["train"]["iters"]
    done = {(n, s): json.loads((work / f"{n}_s{s}.json").read_text()) for n in args.variants for s in args.seeds
            if (work / f"{n}_s{s}.json").is_file()}
    stale = [f"{n}_s{s} ({row['iterations']} steps)" for (n, s), row in done.items() if row["iterations"] != iters]
    if stale and not args.report:
        raise SystemExit(f"{work} holds runs of another budget than {iters} steps: {', '.join(stale)}; "
                         "use another --work")
    pending = [] if args.report else [(n, s) for n in args.variants for s in args.seeds if (n, s) not in done]
    running: list[tuple[str, int, subprocess.Popen]] = []
    forward = [a for a in sys.argv[1:]]
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            name, seed = pending.pop(0)
            log = open(work / f"{name}_s{seed}.log", "w")
            proc = subprocess.Popen([sys.executable, __file__, *forward, "--one", name, str(seed)], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            running.append((name, seed, proc))
        time.sleep(5)
        for item in list(running):
            if item[2].poll() is not None:
                running.remove(item)
                print(f"{item[0]} seed {item[1]} finished (exit {item[2].returncode})", flush=True)
    rows = [json.loads((work / f"{n}_s{s}.json").read_text()) for n in args.variants for s in args.seeds
            if (work / f"{n}_s{s}.json").is_file()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    (out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "machine": machine, "threads": args.threads,
                                                     "jobs": args.jobs, "wall_seconds": round(time.time() - t0)},
                                                    indent=1))
    lines, beyond = spread_table(rows, args.variants)
    plot(rows, args.variants, out / f"{args.name}.png")
    iters = rows[0]["iterations"] if rows else "?"
    mean_step = sum(r["seconds_per_iter"] for r in rows) / max(len(rows), 1)
    width = "half-width " if "timm_kwargs" in demo["model"] else ""
    md = f"""# Codecs (and Table 1b-1e variants) end to end: the demo's ISTR on easy synthetic shapes

`python benchmarks/codecs_e2e.py {'' if args.name == 'codecs_e2e' else f'--name {args.name} '}--variants {' '.join(args.variants)} --seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs} --threads {args.threads}`:
{PRESET} with its demo settings (`istr.demo.demo_settings("{PRESET}")`: {demo['model']['num_queries']} queries, {width}ResNet-18;
{iters} steps of 8 images, denoising x{demo['model']['denoising_groups']}), one change per row, evaluated on the
{DEMO_DATA['easy']['num_val']} validation images. Values in %: mean over seeds (per-seed values).

| variant | mask AP | mask AP50 | mask AP75 | box AP | codec reconstruction IoU (val masks) |
|---|---|---|---|---|---|
{chr(10).join(lines)}

Differences beyond the seed spread (per-seed mask AP ranges do not overlap): {', '.join(beyond) if beyond else 'none'}.

![mask AP per variant]({args.name}.png)

Machine: {machine['cpu']}, {machine['cores']} cores, {args.jobs} runs at once with {args.threads} thread(s) each,
torch {machine['torch']}; {mean_step:.2f} s per training step in each run.
"""
    (out / f"{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
