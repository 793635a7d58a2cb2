"""The CPU demo: synthetic shapes -> PCA codec -> istr_tiny trained for a wall-clock budget -> COCO eval -> report."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_DATA", "DEMO_MODEL", "DEMO_TRAIN", "DEMO_CODEC", "fit_demo_codec", "build_demo_model", "run_demo",
           "fit_schedule_to_budget", "machine_info", "plot_loss_curve"]

# Settings measured on the 2-core CPU dev machine (benchmarks/convergence.py). The backbone learns from scratch only
# at a low lr: with AdamW at lr 1e-3, a ResNet-18 FPN + RoIAlign at the ground-truth boxes + MLP stayed at chance
# (12.5%) shape accuracy after 300 iterations; at 2e-4 it reached 57% (`convergence.py --probe`). So the backbone
# trains at 2e-4 (backbone_lr_mult 0.4) and the head at 5e-4. Even so, ISTR's set prediction needs far more steps
# than 10 CPU minutes give (~850 at 0.7 s each). Mask AP stayed below 0.01 after 150-900 iterations in every setting
# tried: lr 2e-4..1.5e-3 (head 1e-3 with backbone 2e-4 too), 10-50 queries, 64-128 px, 1-8 objects per image,
# no small objects, focal weight 6, RoI-conv mask head, grid-initialised query boxes. Given 30 minutes (2,280
# iterations) this setting reached mask AP 0.5% / box AP 3.0%, still rising (benchmarks/results/convergence_cpu.md).
# The same Trainer does fit real images (tests/test_real_tiny.py). Denoising training (2 jittered copies of the GT
# boxes as extra training queries, ISTR(denoising_groups=2); not in the paper, inference unchanged) gives the head
# direct targets from the first step: in two 10-minute runs it reached mask / box AP 0.37 / 1.68% and 0.11 / 0.98%,
# against 0.05 / 0.74% and 0.04 / 0.82% without it (~570 instead of ~760 iterations: ~1.05 s a step, not ~0.79 s).
# The from-scratch backbone is the first bottleneck: started from a trunk trained 21 more CPU minutes as a semantic
# segmenter (`convergence.py --dense-probe ... --save`, `run_demo(backbone_checkpoint=...)`), the same 10 minutes gave
# mask / box AP 1.63 / 4.62%, though the mask-embedding loss still had hardly moved (convergence_cpu.md).
DEMO_DATA: dict[str, Any] = dict(num_train=1000, num_val=50, image_size=128, seed=0, min_objects=2, max_objects=8)
DEMO_MODEL: dict[str, Any] = dict(num_queries=20, min_size=128, max_size=128, train_min_sizes=None,
                                  detections_per_image=50, denoising_groups=2)
DEMO_TRAIN: dict[str, Any] = dict(lr=5e-4, backbone_lr_mult=0.4, batch_size=8, warmup_iters=50, decay_at=0.8,
                                  gamma=0.1, clip_grad_norm=1.0, flip=True)
DEMO_CODEC: dict[str, Any] = dict(mask_size=28, dim=60, whiten=True, logit_space=True)  # ISTR v1's PCA-60


def fit_demo_codec(train_annotations: str | Path):
    """The demo's PCA codec (DEMO_CODEC) fitted on the masks of a COCO json -> (codec, the grids it was fit on)."""
    import istr
    from istr.engine.fit_codec import coco_mask_grids

    codec = istr.create_codec("pca", **DEMO_CODEC)
    grids = coco_mask_grids(train_annotations, codec.mask_size)
    codec.fit(grids)
    return codec, grids


def build_demo_model(data_dir: str | Path, codec, model_cfg: dict[str, Any], flip: bool = True, seed: int = 0):
    """(istr_tiny with `model_cfg` overrides and `codec`, train set (h-flips if `flip`), val set) for a dataset
    written by make_synthetic_coco in data_dir. The model is initialised after torch.manual_seed(seed)."""
    import istr
    from istr.data import CocoInstances, build_transforms

    data_dir = Path(data_dir)
    ann = data_dir / "annotations"
    transforms = build_transforms(True, crop_prob=0.0) if flip else None
    train_set = CocoInstances(data_dir / "train", ann / "instances_train.json", transforms=transforms)
    val_set = CocoInstances(data_dir / "val", ann / "instances_val.json", include_empty=True)
    torch.manual_seed(seed)
    model = istr.create_model("istr_tiny", num_classes=train_set.num_classes, codec=codec, **model_cfg)
    return model, train_set, val_set


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch threads and versions, and the load average (the CPU may be shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def fit_schedule_to_budget(calibration_iters: int = 20, decay_at: float = 0.8, every: int = 10):
    """Callback for Trainer: put the lr step decay at `decay_at` of the iterations that fit in cfg.max_minutes.

    From iteration calibration_iters + 1 on, and every `every` iterations until the decay has happened, it
    re-estimates the total number of iterations from the mean speed so far and moves cfg.milestones there
    (the schedule reads cfg lazily). Training itself stops on the time budget (or a given cfg.max_iters), so a
    slow start (e.g. other processes on the CPU) does not end the run early.
    """
    state: dict[str, float] = {}

    def callback(trainer, losses) -> None:
        it, cfg = trainer.iteration, trainer.cfg
        if it == 1:
            state["t1"] = time.perf_counter()
        if cfg.max_minutes is None or it <= max(1, calibration_iters) or (it - calibration_iters - 1) % every:
            return
        if cfg.milestones and it >= cfg.milestones[0]:
            return  # the decay has happened: keep it
        per_iter = (time.perf_counter() - state["t1"]) / (it - 1)
        left = cfg.max_minutes * 60 - (trainer.elapsed_before + trainer._run_elapsed())
        total = it + max(0, int(left / per_iter))
        if cfg.max_iters is not None:
            total = min(total, cfg.max_iters)
        cfg.milestones = (max(it + 1, int(decay_at * total)),)
        if trainer.is_main:
            trainer._log({"iter": it, "event": "schedule", "seconds_per_iter": round(per_iter, 4),
                          "expected_iters": total, "milestones": list(cfg.milestones)})

    return callback


def plot_loss_curve(log_file: str | Path, out_png: str | Path, smooth: int = 10) -> Path:
    """Plot total loss and the last stage's loss terms (moving average) with the lr, from a log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(l) for l in Path(log_file).read_text().splitlines() if l.strip()]
    records = [r for r in records if "event" not in r]
    if not records:
        raise ValueError(f"{log_file} has no iteration records to plot")
    iters = [r["iter"] for r in records]

    def avg(values: list[float]) -> list[float]:
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v
            if i >= smooth:
                acc -= values[i - smooth]
            out.append(acc / min(i + 1, smooth))
        return out

    last = max((int(k.rsplit("_s", 1)[1]) for k in records[-1] if "_s" in k and k.rsplit("_s", 1)[1].isdigit()),
               default=None)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(iters, [r["loss"] for r in records], alpha=0.25, color="C0")
    ax0.plot(iters, avg([r["loss"] for r in records]), color="C0", label=f"total (mean of {smooth})")
    ax0.set(xlabel="iteration", ylabel="loss (sum over stages and terms)", yscale="log", title="training loss")
    lr_ax = ax0.twinx()
    lr_ax.plot(iters, [r["lr"] for r in records], color="C3", lw=1, ls="--")
    lr_ax.set_ylabel("learning rate", color="C3")
    ax0.legend(loc="upper right")
    if last is not None:
        # denoising terms (ISTR(denoising_groups=G)) dashed, in the colour of the matched term
        for j, key in enumerate(sorted(k for k in records[-1] if k.endswith(f"_s{last}") and "_dn_s" not in k)):
            for name, style in ((key, "-"), (key.replace(f"_s{last}", f"_dn_s{last}"), "--")):
                if name in records[-1]:
                    ax1.plot(iters, avg([r.get(name, float("nan")) for r in records]), style, label=name, color=f"C{j}")
        ax1.set(xlabel="iteration", ylabel="weighted loss", yscale="log", title=f"last stage (s{last}) terms")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _upscale(image: torch.Tensor, target: dict[str, Any], factor: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Nearest-neighbour upscaling of an image and its boxes/masks, so small demo images get readable labels."""
    import torch.nn.functional as F

    if factor == 1:
        return image, target
    target = dict(target)
    target["boxes"] = target["boxes"] * factor
    if target.get("masks") is not None and len(target["masks"]):
        masks = target["masks"].float()
        squeeze = masks.ndim == 3
        masks = masks[:, None] if squeeze else masks
        masks = F.interpolate(masks, scale_factor=factor, mode="nearest")
        target["masks"] = masks[:, 0] if squeeze else masks
    elif target.get("masks") is not None:
        h, w = target["masks"].shape[-2:]
        target["masks"] = target["masks"].new_zeros((*target["masks"].shape[:-2], h * factor, w * factor))
    return F.interpolate(image[None], scale_factor=factor, mode="nearest")[0], target


def _overlays(model, val_set, out_dir: Path, count: int, score_threshold: float, min_side: int = 384) -> list[str]:
    from istr.engine.predict import predict
    from istr.viz import draw_instances, save_image

    paths = []
    for i in range(min(count, len(val_set))):
        image, target = val_set[i]
        result = predict(model, image)
        factor = max(1, min_side // min(image.shape[-2:]))
        big, target = _upscale(image, target, factor)
        _, result = _upscale(image, result, factor)
        gt = draw_instances(big, target, class_names=val_set.category_names)
        pred = draw_instances(big, result, class_names=val_set.category_names, score_threshold=score_threshold)
        gap = torch.full((3, big.shape[1], 8), 255, dtype=torch.uint8)
        path = save_image(torch.cat([gt, gap, pred], dim=2), out_dir / f"val_{target['image_id']:06d}.png")
        paths.append(str(path))
    return paths


def _codec_iou(codec, grids: torch.Tensor) -> float:
    with torch.no_grad():
        recon = codec.decode(codec.encode(grids))
    inter = ((recon >= 0.5) & (grids >= 0.5)).flatten(1).sum(1).float()
    union = ((recon >= 0.5) | (grids >= 0.5)).flatten(1).sum(1).float().clamp(min=1)
    return float((inter / union).mean())


def run_demo(out_dir: str | Path = "runs/demo", minutes: float = 10.0, *, threads: int | None = None, seed: int = 0,
             num_train: int | None = None, num_val: int | None = None, image_size: int | None = None,
             max_iters: int | None = None, lr: float | None = None, batch_size: int | None = None,
             device: str = "cpu", pretrained: bool = False, backbone_checkpoint: str | Path | None = None,
             progress: bool = True, overlays: int = 6) -> dict[str, Any]:
    """Run the whole demo and write out_dir/{report.md, metrics.json, loss_curve.png, overlays/, data/, train/}.

    minutes: the training budget (wall clock; data generation, codec fit and evaluation come on top).
    threads: torch CPU threads (default: every core). device: where to train and evaluate ("cpu", "cuda", ...).
    The backbone starts from random weights unless `pretrained` (timm's ImageNet weights: needs the network) or
    `backbone_checkpoint` (a local timm-format ResNet-18 file) is given. Returns the metrics.json content.
    """
    from istr.data import make_synthetic_coco
    from istr.engine.evaluate import evaluate
    from istr.engine.fit_codec import coco_mask_grids
    from istr.engine.train import TrainConfig, Trainer

    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if backbone_checkpoint is not None and not Path(backbone_checkpoint).is_file():
        raise FileNotFoundError(f"no backbone checkpoint at {backbone_checkpoint}")
    if pretrained and backbone_checkpoint is not None:
        raise ValueError("pass either pretrained=True (timm's ImageNet weights) or backbone_checkpoint, not both")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()

    data_cfg = {**DEMO_DATA, **{k: v for k, v in (("num_train", num_train), ("num_val", num_val),
                                                   ("image_size", image_size)) if v is not None}}
    data_dir = out / "data"
    marker = data_dir / "demo_data.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == data_cfg):
        print(f"generating the synthetic dataset ({data_cfg['num_train']} train / {data_cfg['num_val']} val images, "
              f"{data_cfg['image_size']} px) in {data_dir}")
        make_synthetic_coco(data_dir, **data_cfg)
        marker.write_text(json.dumps(data_cfg))
    train_ann = data_dir / "annotations" / "instances_train.json"
    val_ann = data_dir / "annotations" / "instances_val.json"
    t_data = time.perf_counter()

    codec, grids = fit_demo_codec(train_ann)
    codec.save(out / "codec.safetensors")
    codec_iou = {"train": _codec_iou(codec, grids), "val": _codec_iou(codec, coco_mask_grids(val_ann, codec.mask_size))}
    print(f"PCA codec (l=60, 28x28) fitted on {len(grids)} training masks: reconstruction IoU "
          f"{codec_iou['val']:.3f} on validation masks")
    t_codec = time.perf_counter()

    train_cfg = {**DEMO_TRAIN, **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None}}
    model_cfg = {**DEMO_MODEL, "min_size": data_cfg["image_size"], "max_size": data_cfg["image_size"]}
    if pretrained:
        model_cfg["pretrained"] = True
    if backbone_checkpoint is not None:
        model_cfg["checkpoint_path"] = str(backbone_checkpoint)
    model, train_set, val_set = build_demo_model(data_dir, codec, model_cfg, train_cfg["flip"], seed)
    cfg = TrainConfig(lr=train_cfg["lr"], backbone_lr_mult=train_cfg["backbone_lr_mult"],
                      batch_size=train_cfg["batch_size"], max_iters=max_iters,
                      max_minutes=minutes, warmup_iters=train_cfg["warmup_iters"], milestones=(),
                      gamma=train_cfg["gamma"], clip_grad_norm=train_cfg["clip_grad_norm"], seed=seed,
                      checkpoint_every=0, log_every=10, progress=progress, device=device, eval_at_end=False)
    calibration = max(1, min(20, max_iters - 1)) if max_iters else 20
    trainer = Trainer(model, train_set, cfg, out_dir=out / "train",
                      callbacks=[fit_schedule_to_budget(calibration, train_cfg["decay_at"])])
    result = trainer.train()
    t_train = time.perf_counter()

    metrics = evaluate(model, val_set, device=device, progress=False)
    t_eval = time.perf_counter()
    plot_loss_curve(out / "train" / "log.jsonl", out / "loss_curve.png")
    overlay_paths = _overlays(model, val_set, out / "overlays", overlays, score_threshold=0.4)

    report = {
        "metrics": {k: v for k, v in metrics.items() if k in ("bbox", "segm")},
        "iterations": result.iterations, "train_seconds": round(result.elapsed_s, 1),
        "images_seen": result.iterations * cfg.batch_size,
        "eval_seconds": round(t_eval - t_train, 1), "data_seconds": round(t_data - t_start, 1),
        "codec_seconds": round(t_codec - t_data, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1), "stop_reason": result.stop_reason,
        "budget_minutes": minutes, "max_iters_requested": max_iters, "codec_reconstruction_iou": codec_iou,
        "data": data_cfg, "model": {"preset": "istr_tiny", **model_cfg,
                                     "parameters": sum(p.numel() for p in model.parameters())},
        "train": {**train_cfg, "device": device, "milestones": list(cfg.milestones), "warmup_factor": cfg.warmup_factor,
                  "weight_decay": cfg.weight_decay, "seed": seed},
        "machine": {**machine, "load_average_1m_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "files": {"model": result.model_path, "log": str(out / "train" / "log.jsonl"), "overlays": overlay_paths},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_report_md(report))
    return report


def _stop_text(r: dict[str, Any]) -> str:
    if r["stop_reason"] == "time_budget":
        return "stopped when the budget ran out"
    return "stopped at the requested --max-iters"


def _device_text(r: dict[str, Any]) -> str:
    device, gpu = r["train"]["device"], r["machine"].get("cuda")
    return f"{device} ({gpu})" if gpu and device != "cpu" else device


def _init_text(r: dict[str, Any]) -> str:
    if r["model"].get("checkpoint_path"):
        return f"the backbone checkpoint `{r['model']['checkpoint_path']}` (FPN and head from random initialisation)"
    if r["model"].get("pretrained"):
        return "timm's ImageNet ResNet-18 weights (FPN and head from random initialisation)"
    return "random initialisation"


def _denoising_text(r: dict[str, Any]) -> str:
    groups = r["model"].get("denoising_groups", 0)
    if not groups:
        return ""
    return (f" with denoising training ({groups} jittered copies of the ground-truth boxes as extra training-only "
            "queries, not in the paper; inference is plain ISTR)")


def _report_md(r: dict[str, Any]) -> str:
    m, mach = r["metrics"], r["machine"]
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    fmt = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"  # noqa: E731
    rows = "\n".join(f"| {name} | " + " | ".join(fmt(m[key].get(c)) for c in cols) + " |"
                     for name, key in (("mask (segm)", "segm"), ("box (bbox)", "bbox")))
    overlays = "\n".join(f"![{Path(p).name}](overlays/{Path(p).name})" for p in r["files"]["overlays"])
    return f"""# istr CPU demo

ISTR (`istr_tiny`: ResNet-18 FPN, {r['model']['num_queries']} queries, 3 stages, PCA-60 codec on 28x28 masks,
{r['model']['parameters'] / 1e6:.1f} M parameters) trained from {_init_text(r)}{_denoising_text(r)} on the synthetic shapes
dataset (`istr.data.make_synthetic_coco`: {r['data']['num_train']} training / {r['data']['num_val']} validation
images of {r['data']['image_size']} px, 8 shape classes), evaluated with pycocotools COCOeval on the validation images.

## Results (COCO AP, %, validation images)

| | {' | '.join(cols)} |
|---|{'---|' * len(cols)}
{rows}

APs/APm/APl: small/medium/large objects (area < 32², < 96², larger); n/a where no such ground truth exists.
PCA codec reconstruction IoU (upper bound on mask quality): {r['codec_reconstruction_iou']['val']:.3f} on validation masks.

## Training

| | |
|---|---|
| training time | {r['train_seconds']:.0f} s (budget {r['budget_minutes']:g} min; {_stop_text(r)}) |
| iterations | {r['iterations']} (batch {r['train']['batch_size']}, {r['images_seen']} images seen) |
| device | {_device_text(r)} |
| optimizer | AdamW lr {r['train']['lr']:g} (backbone x{r['train']['backbone_lr_mult']:g}), weight decay {r['train']['weight_decay']:g}, warmup {r['train']['warmup_iters']} iters, lr x{r['train']['gamma']:g} at {r['train']['milestones']}, grad clip {r['train']['clip_grad_norm']} |
| evaluation time | {r['eval_seconds']:.0f} s |
| data generation, codec fit | {r['data_seconds']:.0f} s, {r['codec_seconds']:.0f} s |
| total wall time | {r['total_seconds']:.0f} s |

![loss curve](loss_curve.png)

## Machine

{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']}, Python {mach['python']},
{mach['platform']}. Load average (1 min) at start {mach.get('load_average_1m')}, at the end {mach.get('load_average_1m_end')}
(a load above the core count means other processes shared the CPU and the run got fewer iterations).

## Predictions (left: ground truth, right: prediction, score >= 0.4)

{overlays}

Files: `metrics.json` (all numbers), `train/log.jsonl` (per-iteration losses, lr, time), `train/model.safetensors`
(load with `istr.load_model`), `codec.safetensors`, `data/` (the dataset).
"""
