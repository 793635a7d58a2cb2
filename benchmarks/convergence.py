"""AP against training iterations for variants of the demo (synthetic shapes, PCA-60, a small ISTR), in parallel.

    python benchmarks/convergence.py --out runs/convergence --iters 1500 --eval-every 250 --device cuda \
        --variants base lr1e-3 b4

Each variant is the demo's settings on the hard data (istr.demo.DEMO_DATA["hard"] / demo_settings("istr_tiny")) with
overrides from VARIANTS (the easy data: a "data" override {"difficulty": "easy", "image_size": 96, ...});
each runs in its own process (--jobs at a time) with a fixed iteration count, so a GPU can say in minutes which
settings learn fastest per iteration; `--time-cpu` instead times a few CPU iterations of each variant (what one
iteration costs in the demo's real setting), and `--probe LR ...` trains the backbone alone as a classifier at the
ground-truth boxes (does it learn the shapes at this lr?). Writes OUT/<variant>/log.jsonl and OUT/summary.{json,md}.
The demo's model changed on 2026-11-29 (10 queries and a half-width ResNet-18, from 20 queries and the full width);
the hard-data results in benchmarks/results/convergence_cpu.md used the earlier one: the variant `q20_full` restores it.

    python benchmarks/convergence.py --probe 1e-3 2e-4 --iters 300 --threads 2
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

# overrides of the demo's settings (istr.demo); runs before the demo's backbone_lr_mult=0.4 pin it to 1.0
EASY = {"min_objects": 1, "max_objects": 4, "small_fraction": 0.0}  # fewer shapes, none small
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "base": {},
    "q20_full": {"model": {"num_queries": 20, "timm_kwargs": {}}},
    **{f"lr{lr}": {"train": {"lr": float(lr), "backbone_lr_mult": 1.0}} for lr in ("1e-4", "2e-4", "1e-3", "1.5e-3")},
    "lr5e-4_bb0.4": {"train": {"lr": 5e-4, "backbone_lr_mult": 0.4}},
    "few_obj_lr1.5e-3": {"data": {"min_objects": 1, "max_objects": 4}, "train": {"lr": 1.5e-3, "backbone_lr_mult": 1.0}},
    "easy_lr2e-4": {"data": EASY, "train": {"lr": 2e-4, "backbone_lr_mult": 1.0}},
    "easy_lr2e-4_q10": {"data": EASY, "train": {"lr": 2e-4, "backbone_lr_mult": 1.0}, "model": {"num_queries": 10}},
    "easy_lr1e-3_bb0.2": {"data": EASY, "train": {"lr": 1e-3, "backbone_lr_mult": 0.2}},
    "easy_lr1e-3_bb0.2_focal6": {"data": EASY, "train": {"lr": 1e-3, "backbone_lr_mult": 0.2},
                                 "model": {"losses": {"focal": 6.0, "l1": 5.0, "giou": 2.0, "embed_l2": 2.0, "dice": 2.0}}},
    # the --time-cpu rows of benchmarks/results/convergence_cpu.md
    "b4": {"train": {"batch_size": 4}},
    "q50": {"model": {"num_queries": 50}},
    "s2": {"model": {"num_stages": 2}},
    "px96": {"data": {"image_size": 96}},
    "r10t": {"model": {"backbone": "resnet10t"}},
    "hd256": {"model": {"hidden_dim": 256, "dynamic_dim": 64, "ffn_dim": 1024, "num_heads": 8}},
    # denoising training (ISTR(denoising_groups=G)): G jittered copies of the GT boxes as extra training queries
    # (the demo trains with 2 since 2026-11-22; every row of convergence_cpu.md before that section used 0)
    **{f"dn{g}": {"model": {"denoising_groups": g}} for g in (0, 1, 2, 4)},
    # a half-width ResNet-18 (timm's `channels`, `stem_width`): about a quarter of the backbone's FLOPs
    "rn18_half": {"model": {"timm_kwargs": {"channels": [32, 64, 128, 256], "stem_width": 32}}},
}


def merged(name: str, extra: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    from istr.demo import DEMO_DATA, demo_settings

    demo = demo_settings("istr_tiny")
    over = {**VARIANTS.get(name, {})}
    for part, values in (extra or {}).items():
        over[part] = {**over.get(part, {}), **values}
    return {"data": {**DEMO_DATA["hard"], **over.get("data", {})}, "model": {**demo["model"], **over.get("model", {})},
            "train": {**demo["train"], **over.get("train", {})}}


def dataset(root: Path, data_cfg: dict[str, Any]) -> Path:
    """Generate (once, keyed by its settings) the synthetic dataset for these data settings."""
    from istr.data import make_synthetic_coco

    key = "_".join(f"{k}{v}" for k, v in sorted(data_cfg.items()))
    out = root / "data" / key
    marker = out / "done.json"
    if not marker.is_file():
        make_synthetic_coco(out, **data_cfg)
        marker.write_text(json.dumps(data_cfg))
    return out


def build(cfg: dict[str, dict[str, Any]], data_dir: Path, seed: int):
    """(model, train set, val set) exactly as the demo builds them, from merged settings."""
    from istr.demo import build_demo_model

    size = cfg["data"]["image_size"]
    return build_demo_model(data_dir, "istr_tiny", {**cfg["model"], "min_size": size, "max_size": size},
                            cfg["train"].get("flip", True), seed)


def run_one(name: str, args: argparse.Namespace) -> None:
    import torch

    from istr.engine.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    cfg = merged(name, json.loads(args.extra) if args.extra else None)
    root = Path(args.out)
    model, train_set, val_set = build(cfg, dataset(root, cfg["data"]), args.seed)
    t = cfg["train"]
    decay = int(t["decay_at"] * args.iters)
    tc = TrainConfig(lr=t["lr"], batch_size=t["batch_size"], max_iters=args.iters, max_minutes=args.minutes,
                     warmup_iters=t["warmup_iters"],
                     milestones=(decay,) if decay < args.iters else (), gamma=t["gamma"],
                     clip_grad_norm=t["clip_grad_norm"], seed=args.seed, checkpoint_every=0, log_every=50,
                     eval_every=args.eval_every, eval_at_end=True, progress=False, device=args.device,
                     backbone_lr_mult=t.get("backbone_lr_mult", 1.0))
    out = root / name
    t0 = time.perf_counter()
    Trainer(model, train_set, tc, val_dataset=val_set, out_dir=out).train()
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    curve = [{"iter": e["iter"], "segm_AP": e["metrics"]["segm"]["AP"], "bbox_AP": e["metrics"]["bbox"]["AP"]}
             for e in evals]
    (out / "curve.json").write_text(json.dumps({"name": name, "config": cfg, "curve": curve,
                                                "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


def time_cpu(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training iteration on this machine's CPU (the mean of iterations 4..N, after warm-up)."""
    import torch

    from istr.engine.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    cfg = merged(name, json.loads(args.extra) if args.extra else None)
    model, train_set, _ = build(cfg, dataset(Path(args.out), cfg["data"]), args.seed)
    t = cfg["train"]
    tc = TrainConfig(lr=t["lr"], batch_size=t["batch_size"], max_iters=args.iters, warmup_iters=0, milestones=(),
                     seed=args.seed, checkpoint_every=0, log_every=0, eval_at_end=False, progress=False, device="cpu")
    trainer = Trainer(model, train_set, tc, out_dir=Path(args.out) / "timing" / name)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    per = sum(times[3:]) / max(1, len(times) - 3)
    return {"name": name, "seconds_per_iter": round(per, 4), "iters_in_10_min": int(600 / per)}


def probe(lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """How fast does the backbone learn the shapes on its own? Train istr_tiny's ResNet-18 FPN from scratch with
    RoIAlign (7x7) at the ground-truth boxes + a 2-layer MLP + cross-entropy on the 8 classes (AdamW at `lr`, the
    demo's data and batch), and report the training accuracy over the last 25 of args.iters iterations."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from istr.models.istr.head import multiscale_roi_align

    torch.set_num_threads(args.threads)
    cfg = merged("base", json.loads(args.extra) if args.extra else None)
    model, train_set, _ = build(cfg, dataset(Path(args.out), cfg["data"]), args.seed)
    backbone, dim = model.backbone, model.hparams["hidden_dim"]
    head = nn.Sequential(nn.Flatten(), nn.Linear(dim * 49, 256), nn.ReLU(), nn.Linear(256, train_set.num_classes))
    opt = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=lr, weight_decay=1e-4)
    gen, hits, t0 = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
    for _ in range(args.iters):
        batch = [train_set[int(i)] for i in torch.randint(len(train_set), (cfg["train"]["batch_size"],), generator=gen)]
        images, _ = model.transform([img for img, _ in batch])  # normalised; min_size = max_size = the image size
        k = max(len(t["labels"]) for _, t in batch)
        boxes, labels = torch.zeros(len(batch), k, 4), torch.full((len(batch), k), -1)
        for i, (_, t) in enumerate(batch):
            boxes[i, :len(t["labels"])], labels[i, :len(t["labels"])] = t["boxes"], t["labels"]
        keep = labels.flatten() >= 0
        logits = head(multiscale_roi_align(backbone(images), boxes, 7))[keep]
        loss = F.cross_entropy(logits, labels.flatten()[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append(float((logits.argmax(1) == labels.flatten()[keep]).float().mean()))
    return {"lr": lr, "iters": args.iters, "train_accuracy_last_25": round(sum(hits[-25:]) / len(hits[-25:]), 3),
            "chance": round(1 / train_set.num_classes, 3), "seconds": round(time.perf_counter() - t0, 1)}


def dense_probe(lr: float, args: argparse.Namespace) -> dict[str, Any]:
    """Does dense supervision make the backbone learn faster? Train istr_tiny's backbone (ResNet-18 FPN, or the
    variant's, e.g. --extra '{"model": {"timm_kwargs": ...}}') from scratch as a semantic segmenter: 3x3 conv + ReLU +
    1x1 conv on P2, upsampled x4, cross-entropy over background + the 8 classes at every pixel of the demo's
    training images (AdamW at `lr`, warmup 50, batch args.batch). Reports, over the last 25 iterations, the share of
    foreground pixels given their class and of background pixels called background."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(args.threads)
    cfg = merged("base", json.loads(args.extra) if args.extra else None)
    model, train_set, _ = build(cfg, dataset(Path(args.out), cfg["data"]), args.seed)
    backbone, dim, classes = model.backbone, model.hparams["hidden_dim"], train_set.num_classes + 1
    head = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, classes, 1))
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen, fg_hits, bg_hits, t0 = torch.Generator().manual_seed(args.seed), [], [], time.perf_counter()
    for it in range(args.iters):
        batch = [train_set[int(i)] for i in torch.randint(len(train_set), (args.batch,), generator=gen)]
        images, _ = model.transform([img for img, _ in batch])  # normalised; min_size = max_size = the image size
        sem = torch.zeros(len(batch), *images.shape[-2:], dtype=torch.long)
        for i, (_, t) in enumerate(batch):
            for mask, label in zip(t["masks"].bool(), t["labels"]):  # visible parts: they do not overlap
                sem[i, : mask.shape[0], : mask.shape[1]][mask] = int(label) + 1
        logits = F.interpolate(head(backbone(images)[0]), size=sem.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, sem)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (it + 1) / 50)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            pred, fg = logits.argmax(1), sem > 0
            fg_hits.append(float((pred[fg] == sem[fg]).float().mean()))
            bg_hits.append(float((pred[~fg] == 0).float().mean()))
    last = lambda v: round(sum(v[-25:]) / len(v[-25:]), 3)  # noqa: E731
    saved = None
    if args.save:  # the trunk in timm's format: `istr demo --backbone-checkpoint FILE` starts from it
        saved = Path(args.save)
        if len(args.dense_probe) > 1:  # one file per lr
            saved = saved.with_stem(f"{saved.stem}_lr{lr:g}")
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(backbone.body.state_dict(), saved)
    return {"lr": lr, "iters": args.iters, "batch": args.batch, "saved": str(saved) if saved else None,
            "foreground_class_accuracy_last_25": last(fg_hits),
            "background_accuracy_last_25": last(bg_hits), "seconds": round(time.perf_counter() - t0, 1),
            "backbone": {"name": backbone.name, "timm_kwargs": backbone.timm_kwargs}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--variants", nargs="*", default=["base"], help=f"names from: {', '.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--minutes", type=float, default=None, help="also stop each variant after this many minutes")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=4, help="variants trained at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", default=None, help='JSON overrides for every variant, e.g. \'{"train": {"lr": 1e-3}}\'')
    p.add_argument("--time-cpu", action="store_true", help="time CPU iterations per variant instead of training")
    p.add_argument("--probe", type=float, nargs="*", default=None, metavar="LR",
                   help="backbone probe at these lrs instead of training ISTR (see probe())")
    p.add_argument("--dense-probe", type=float, nargs="*", default=None, metavar="LR",
                   help="dense (semantic segmentation) backbone probe at these lrs (see dense_probe())")
    p.add_argument("--batch", type=int, default=16, help="batch size of --dense-probe")
    p.add_argument("--save", metavar="FILE", help="--dense-probe: write the trained trunk here (timm format, .pth)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args.one, args)
    if args.probe:
        for lr in args.probe:
            print(json.dumps(probe(lr, args)), flush=True)
        return None
    if args.dense_probe:
        for lr in args.dense_probe:
            print(json.dumps(dense_probe(lr, args)), flush=True)
        return None
    if args.time_cpu:
        rows = [time_cpu(n, args) for n in args.variants]
        for r in rows:
            print(json.dumps(r))
        return None
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for name in args.variants:  # generate data up front so parallel jobs don't race on it
        dataset(root, merged(name, json.loads(args.extra) if args.extra else None)["data"])
    pending, running = list(args.variants), []
    forward = [a for a in sys.argv[1:]]
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            log = open(root / f"{name}.out", "w")
            running.append((name, subprocess.Popen([sys.executable, __file__, *forward, "--one", name],
                                                   stdout=log, stderr=subprocess.STDOUT,
                                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})))
        time.sleep(2)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                print(f"{item[0]} finished (exit {item[1].returncode})", flush=True)
    summary = []
    for name in args.variants:
        f = root / name / "curve.json"
        summary.append(json.loads(f.read_text()) if f.is_file() else {"name": name, "curve": [], "failed": True})
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    iters = sorted({c["iter"] for s in summary for c in s["curve"]})
    lines = ["| variant | " + " | ".join(f"{i}" for i in iters) + " | s |", "|---|" + "---|" * (len(iters) + 1)]
    for s in summary:
        by = {c["iter"]: c for c in s["curve"]}
        cells = [f"{100 * by[i]['segm_AP']:.1f} / {100 * by[i]['bbox_AP']:.1f}" if i in by else "" for i in iters]
        lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {s.get('seconds', '')} |")
    table = "mask AP / box AP (%) on the validation images after N iterations\n\n" + "\n".join(lines)
    (root / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
