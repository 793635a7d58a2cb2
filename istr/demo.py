"""The demo: synthetic shapes -> PCA codec -> istr_tiny trained for a fixed number of steps -> COCO eval -> report."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_DATA", "DEMO_MODEL", "DEMO_ISDA_MODEL", "DEMO_TRAIN", "DEMO_CODEC", "HALF_WIDTH_RESNET18",
           "fit_demo_codec", "build_demo_model", "run_demo", "machine_info", "plot_loss_curve"]

# The demo's settings; benchmarks/results/convergence_cpu.md holds the experiments behind them. "easy" data is the
# default: plain backgrounds, 4 shapes, 1-4 medium/large objects at 96 px, learnable in minutes on a CPU. "hard"
# (textured backgrounds, 8 shapes incl. concave and holed ones, 2-8 objects, small ones, 128 px) is the research
# benchmark, far from solved in a CPU budget from random weights.
DEMO_DATA: dict[str, dict[str, Any]] = {
    "easy": dict(difficulty="easy", num_train=1000, num_val=200, image_size=96, seed=0),
    "hard": dict(difficulty="hard", num_train=1000, num_val=50, image_size=128, seed=0, min_objects=2, max_objects=8),
}
# istr_tiny at 96 px with 10 queries (1-4 objects per image) and a half-width ResNet-18 (32-256 channels): cheaper
# steps that also learn faster per step from random weights than 20 queries on the full width. With ImageNet or
# checkpoint weights the demo keeps the full-width ResNet-18 those weights are for.
HALF_WIDTH_RESNET18: dict[str, Any] = {"channels": [32, 64, 128, 256], "stem_width": 32}  # timm_kwargs
DEMO_MODEL: dict[str, Any] = dict(num_queries=10, train_min_sizes=None, detections_per_image=50, denoising_groups=4,
                                  timm_kwargs=HALF_WIDTH_RESNET18)
DEMO_ISDA_MODEL: dict[str, Any] = dict(num_queries=20, train_min_sizes=None, detections_per_image=50)
DEMO_TRAIN: dict[str, Any] = dict(lr=5e-4, backbone_lr_mult=0.4, batch_size=8, iters=2100, warmup_iters=50,
                                  decay_at=0.65, gamma=0.1, clip_grad_norm=1.0, flip=True)
DEMO_CODEC: dict[str, Any] = dict(mask_size=28, dim=60, whiten=True, logit_space=True)  # ISTR v1's PCA-60


def fit_demo_codec(train_annotations: str | Path, codec_cfg: dict[str, Any] | None = None, name: str = "pca"):
    """The demo's codec (DEMO_CODEC PCA-60 unless told otherwise) fitted on the masks of a COCO json ->
    (codec, the grids it was fit on)."""
    import istr
    from istr.engine.fit_codec import coco_mask_grids

    codec = istr.create_codec(name, **(DEMO_CODEC if codec_cfg is None else codec_cfg))
    grids = coco_mask_grids(train_annotations, codec.mask_size)
    codec.fit(grids)
    return codec, grids


def build_demo_model(data_dir: str | Path, codec, model_cfg: dict[str, Any], flip: bool = True, seed: int = 0,
                     preset: str = "istr_tiny"):
    """(preset with `model_cfg` overrides (and `codec` for ISTR), train set (h-flips if `flip`), val set) for a
    dataset written by make_synthetic_coco in data_dir. The model is initialised after torch.manual_seed(seed)."""
    import istr
    from istr.data import CocoInstances, build_transforms

    data_dir = Path(data_dir)
    ann = data_dir / "annotations"
    transforms = build_transforms(True, crop_prob=0.0) if flip else None
    train_set = CocoInstances(data_dir / "train", ann / "instances_train.json", transforms=transforms)
    val_set = CocoInstances(data_dir / "val", ann / "instances_val.json", include_empty=True)
    torch.manual_seed(seed)
    extra = {} if codec is None else {"codec": codec}
    model = istr.create_model(preset, num_classes=train_set.num_classes, **extra, **model_cfg)
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
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


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


def run_demo(out_dir: str | Path = "runs/demo", iters: int | None = None, *, minutes: float | None = None,
             data: str = "easy", model: str = "istr_tiny", threads: int | None = None, seed: int = 0,
             num_train: int | None = None, num_val: int | None = None, image_size: int | None = None,
             lr: float | None = None, batch_size: int | None = None, device: str = "cpu", pretrained: bool = False,
             backbone_checkpoint: str | Path | None = None, progress: bool = True, overlays: int = 6,
             eval_every: int = 0) -> dict[str, Any]:
    """Run the whole demo and write out_dir/{report.md, metrics.json, loss_curve.png, overlays/, model.safetensors,
    codec.safetensors, run.json, data/, train/}.

    iters: training steps (default DEMO_TRAIN's 2100: the same result on any machine); minutes: an optional
    wall-clock cap on top. data: "easy" (default) or "hard" (DEMO_DATA). model: "istr_tiny" or "isda_tiny".
    threads: torch CPU threads (default: every core). device: where to train and evaluate ("cpu", "cuda", ...).
    The backbone starts from random weights unless `pretrained` (timm's ImageNet weights: needs the network) or
    `backbone_checkpoint` (a local timm-format ResNet-18 file) is given. eval_every: also evaluate every N steps
    (the AP curve goes into metrics.json; training is unchanged). Returns the metrics.json content.
    """
    from istr.data import make_synthetic_coco
    from istr.engine.callbacks import StepTimer
    from istr.engine.evaluate import evaluate
    from istr.engine.fit_codec import coco_mask_grids
    from istr.engine.train import TrainConfig, Trainer

    if data not in DEMO_DATA:
        raise ValueError(f"data must be one of {sorted(DEMO_DATA)}, got {data!r}")
    if model not in ("istr_tiny", "isda_tiny"):
        raise ValueError(f"model must be 'istr_tiny' or 'isda_tiny', got {model!r}")
    iters = DEMO_TRAIN["iters"] if iters is None else int(iters)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if minutes is not None and minutes <= 0:
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

    data_cfg = {**DEMO_DATA[data], **{k: v for k, v in (("num_train", num_train), ("num_val", num_val),
                                                         ("image_size", image_size)) if v is not None}}
    data_dir = out / "data"
    marker = data_dir / "demo_data.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == data_cfg):
        if data_dir.exists():
            shutil.rmtree(data_dir)
        print(f"generating the {data} synthetic dataset ({data_cfg['num_train']} train / {data_cfg['num_val']} val "
              f"images of {data_cfg['image_size']} px) in {data_dir}")
        make_synthetic_coco(data_dir, **data_cfg)
        marker.write_text(json.dumps(data_cfg))
    train_ann = data_dir / "annotations" / "instances_train.json"
    val_ann = data_dir / "annotations" / "instances_val.json"
    t_data = time.perf_counter()

    codec, codec_iou = None, None
    if model == "istr_tiny":
        codec, grids = fit_demo_codec(train_ann)
        codec.save(out / "codec.safetensors")
        codec_iou = {"train": _codec_iou(codec, grids), "val": _codec_iou(codec, coco_mask_grids(val_ann, codec.mask_size))}
        print(f"PCA codec (l=60, 28x28) fitted on {len(grids)} training masks: reconstruction IoU "
              f"{codec_iou['val']:.3f} on validation masks")
    t_codec = time.perf_counter()

    train_cfg = {**DEMO_TRAIN, **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None}}
    size = data_cfg["image_size"]
    model_cfg = {**(DEMO_MODEL if model == "istr_tiny" else DEMO_ISDA_MODEL), "min_size": size, "max_size": size}
    if pretrained or backbone_checkpoint is not None:
        model_cfg.pop("timm_kwargs", None)  # the weights are for the full-width ResNet-18
    if pretrained:
        model_cfg["pretrained"] = True
    if backbone_checkpoint is not None:
        model_cfg["checkpoint_path"] = str(backbone_checkpoint)
    net, train_set, val_set = build_demo_model(data_dir, codec, model_cfg, train_cfg["flip"], seed, preset=model)
    decay = int(train_cfg["decay_at"] * iters)
    cfg = TrainConfig(lr=train_cfg["lr"], backbone_lr_mult=train_cfg["backbone_lr_mult"],
                      batch_size=train_cfg["batch_size"], max_iters=iters, max_minutes=minutes,
                      warmup_iters=min(train_cfg["warmup_iters"], iters), milestones=(decay,) if decay < iters else (),
                      gamma=train_cfg["gamma"], clip_grad_norm=train_cfg["clip_grad_norm"], seed=seed,
                      checkpoint_every=0, log_every=10, progress=progress, device=device, eval_at_end=False,
                      eval_every=eval_every, eval_kwargs={"progress": False})
    threads_text = f"{machine['torch_threads']} thread" + ("s" if machine["torch_threads"] != 1 else "")
    print(f"training {model} for {iters} steps of {cfg.batch_size} images ({threads_text}, "
          f"load average {machine.get('load_average_1m')})" + (f", at most {minutes:g} min" if minutes else ""))
    trainer = Trainer(net, train_set, cfg, val_dataset=val_set if eval_every else None, out_dir=out / "train",
                      callbacks=[StepTimer()], overwrite=True)
    result = trainer.train()
    t_train = time.perf_counter()

    metrics = evaluate(net, val_set, device=device, progress=False)
    t_eval = time.perf_counter()
    shutil.copyfile(out / "train" / "model.safetensors", out / "model.safetensors")
    (out / "run.json").write_text(json.dumps({"val_images": str((data_dir / "val").resolve()),
                                              "val_ann": str(val_ann.resolve())}, indent=2))
    plot_loss_curve(out / "train" / "log.jsonl", out / "loss_curve.png")
    score_threshold = 0.4
    overlay_paths = _overlays(net, val_set, out / "overlays", overlays, score_threshold)

    curve = [{"iter": r["iter"], "segm_AP": r["metrics"]["segm"]["AP"], "bbox_AP": r["metrics"]["bbox"]["AP"]}
             for r in map(json.loads, (out / "train" / "log.jsonl").read_text().splitlines()) if r.get("event") == "eval"]
    report = {
        "metrics": {k: v for k, v in metrics.items() if k in ("bbox", "segm")}, "ap_curve": curve,
        "iterations": result.iterations, "train_seconds": round(result.elapsed_s, 1),
        "seconds_per_iter": round(result.elapsed_s / max(result.iterations, 1), 3),
        "images_seen": result.iterations * cfg.batch_size,
        "eval_seconds": round(t_eval - t_train, 1), "data_seconds": round(t_data - t_start, 1),
        "codec_seconds": round(t_codec - t_data, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1), "stop_reason": result.stop_reason,
        "iters_requested": iters, "budget_minutes": minutes, "codec_reconstruction_iou": codec_iou,
        "score_threshold": score_threshold, "data": data_cfg,
        "model": {"preset": model, **model_cfg, "parameters": sum(p.numel() for p in net.parameters())},
        "train": {**train_cfg, "iters": iters, "device": device, "milestones": list(cfg.milestones),
                  "warmup_iters": cfg.warmup_iters,
                  "warmup_factor": cfg.warmup_factor, "weight_decay": cfg.weight_decay, "seed": seed},
        "machine": {**machine, "load_average_1m_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "files": {"model": str(out / "model.safetensors"), "log": str(out / "train" / "log.jsonl"),
                  "overlays": overlay_paths},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_report_md(report))
    return report


def _stop_text(r: dict[str, Any]) -> str:
    if r["stop_reason"] == "time_budget":
        return f"stopped by the {r['budget_minutes']:g}-minute cap before the requested {r['iters_requested']} steps"
    return "all requested steps"


def _device_text(r: dict[str, Any]) -> str:
    device, gpu = r["train"]["device"], r["machine"].get("cuda")
    return f"{device} ({gpu})" if gpu and device != "cpu" else device


def _init_text(r: dict[str, Any]) -> str:
    if r["model"].get("checkpoint_path"):
        return f"the backbone checkpoint `{r['model']['checkpoint_path']}` (neck and head from random initialisation)"
    if r["model"].get("pretrained"):
        return "timm's ImageNet ResNet-18 weights (neck and head from random initialisation)"
    return "random initialisation"


def _model_text(r: dict[str, Any]) -> str:
    m = r["model"]
    if m["preset"] == "isda_tiny":
        return (f"ISDA (`isda_tiny`: ResNet-18 with a channel mapper, deformable transformer, {m['num_queries']} "
                f"queries, dynamic mask kernels; {m['parameters'] / 1e6:.1f} M parameters)")
    dn = m.get("denoising_groups", 0)
    width = " (half width, 32-256 channels)" if m.get("timm_kwargs") == HALF_WIDTH_RESNET18 else ""
    return (f"ISTR (`istr_tiny`: ResNet-18{width} FPN, {m['num_queries']} queries, 3 stages, PCA-60 codec on 28x28 "
            f"masks, {m['parameters'] / 1e6:.1f} M parameters"
            + (f"; trained with {dn} denoising groups, jittered copies of the ground-truth boxes as extra "
               "training-only queries, not in the paper; inference is plain ISTR)" if dn else ")"))


def _report_md(r: dict[str, Any]) -> str:
    m, mach, d = r["metrics"], r["machine"], r["data"]
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    fmt = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"  # noqa: E731
    rows = "\n".join(f"| {name} | " + " | ".join(fmt(m[key].get(c)) for c in cols) + " |"
                     for name, key in (("mask (segm)", "segm"), ("box (bbox)", "bbox")))
    overlays = "\n".join(f"![{Path(p).name}](overlays/{Path(p).name})" for p in r["files"]["overlays"])
    codec = ("" if r["codec_reconstruction_iou"] is None else
             f"PCA codec reconstruction IoU (the ceiling of mask quality): {r['codec_reconstruction_iou']['val']:.3f} "
             "on validation masks.\n")
    return f"""# istr demo

{_model_text(r)} trained from {_init_text(r)} on the **{d['difficulty']}** synthetic shapes dataset
(`istr.data.make_synthetic_coco`: {d['num_train']} training / {d['num_val']} validation images of {d['image_size']} px),
evaluated with pycocotools COCOeval on the validation images.

## Results (COCO AP, %, validation images)

| | {' | '.join(cols)} |
|---|{'---|' * len(cols)}
{rows}

APs/APm/APl: small/medium/large objects (area < 32², < 96², larger); n/a where no such ground truth exists.
{codec}
## Training

| | |
|---|---|
| iterations | {r['iterations']} of {r['iters_requested']} requested ({_stop_text(r)}); batch {r['train']['batch_size']}, {r['images_seen']} images seen |
| training time | {r['train_seconds']:.0f} s, {r['seconds_per_iter']:.3f} s per iteration |
| device | {_device_text(r)} |
| optimizer | AdamW lr {r['train']['lr']:g} (backbone x{r['train']['backbone_lr_mult']:g}), weight decay {r['train']['weight_decay']:g}, warmup {r['train']['warmup_iters']} iters, lr x{r['train']['gamma']:g} at {r['train']['milestones']}, grad clip {r['train']['clip_grad_norm']} |
| evaluation time | {r['eval_seconds']:.0f} s |
| data generation, codec fit | {r['data_seconds']:.0f} s, {r['codec_seconds']:.0f} s |
| total wall time | {r['total_seconds']:.0f} s |

![loss curve](loss_curve.png)

## Machine

{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads ({mach.get('cpu_capability')}), torch {mach['torch']},
Python {mach['python']}, {mach['platform']}. Load average (1 min) at the start {mach.get('load_average_1m')}, at the end
{mach.get('load_average_1m_end')}: a load above the core count means other processes shared the CPU, which slows the run
but does not change its result (the budget is in iterations).

## Predictions (left: ground truth, right: prediction, score >= {r['score_threshold']})

{overlays}

Files: `metrics.json` (all numbers), `train/log.jsonl` (per-iteration losses, lr, time), `model.safetensors`
(`istr.load_model`; `istr predict {Path(r['files']['model']).parent} IMAGE...`, `istr eval {Path(r['files']['model']).parent}`),
`codec.safetensors`, `data/` (the dataset).
"""
