"""The demo: a registered preset's demo settings -> synthetic shapes -> train for a fixed number of steps -> COCO
eval -> metrics.json, report.md, loss curve, overlays. Any preset that carries demo settings runs
(istr.list_models(demo=True)); the settings belong to the preset (its family's presets.py), not to this module."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_DATA", "DEMO_OUTPUTS", "demo_settings", "build_demo_model", "demo_train_config", "run_demo",
           "machine_info"]

# "easy" data is the default: plain backgrounds, 4 shapes, 1-4 medium/large objects at 96 px, learnable in minutes
# on a CPU. "hard" (textured backgrounds, 8 shapes incl. concave and holed ones, 2-8 objects, small ones, 128 px) is
# the research benchmark, far from solved in a CPU budget from random weights.
DEMO_DATA: dict[str, dict[str, Any]] = {
    "easy": dict(difficulty="easy", num_train=1000, num_val=200, image_size=96, seed=0),
    "hard": dict(difficulty="hard", num_train=1000, num_val=50, image_size=128, seed=0, min_objects=2, max_objects=8),
}


# what a demo run writes in its folder besides the synthetic data/ (removed by overwrite=True before a new run)
DEMO_OUTPUTS = ("train", "overlays", "report.md", "metrics.json", "loss_curve.png", "codec.safetensors",
                "model.safetensors", "run.json")


def demo_settings(model: str) -> dict[str, Any]:
    """The demo settings a preset carries: {"model": create_model overrides, "train": training settings,
    "description": report text}; ValueError naming the presets that have some."""
    from istr.models import list_models, preset_info

    settings = preset_info(model).demo if model in list_models() else None
    if settings is None:
        raise ValueError(f"{model!r} has no demo settings; the demo runs {list_models(demo=True)}")
    return settings


def build_demo_model(data_dir: str | Path, model: str, overrides: dict[str, Any] | None = None, flip: bool = True,
                     seed: int = 0):
    """(the preset `model` with its demo settings and `overrides`, train set (h-flips if `flip`), val set) for a
    dataset written by make_synthetic_coco in data_dir. The model is built after torch.manual_seed(seed), then
    prepared for its training data (model.prepare_training: ISTR fits its codec unless one is passed in overrides)."""
    import istr
    from istr.data import CocoInstances, build_transforms

    data_dir = Path(data_dir)
    ann = data_dir / "annotations"
    transforms = build_transforms(True, crop_prob=0.0) if flip else None
    train_set = CocoInstances(data_dir / "train", ann / "instances_train.json", transforms=transforms)
    val_set = CocoInstances(data_dir / "val", ann / "instances_val.json", include_empty=True)
    torch.manual_seed(seed)
    net = istr.create_model(model, num_classes=train_set.num_classes, **{**demo_settings(model)["model"],
                                                                          **(overrides or {})})
    net.prepare_training(ann / "instances_train.json")
    return net, train_set, val_set


def demo_train_config(train: dict[str, Any], iters: int, **extra: Any):
    """The TrainConfig of a demo's training settings for `iters` steps (lr decayed once at decay_at x iters)."""
    from istr.engine import TrainConfig

    decay = int(train["decay_at"] * iters)
    return TrainConfig(lr=train["lr"], backbone_lr_mult=train["backbone_lr_mult"], batch_size=train["batch_size"],
                       max_iters=iters, warmup_iters=min(train["warmup_iters"], iters),
                       milestones=(decay,) if decay < iters else (), gamma=train["gamma"],
                       clip_grad_norm=train["clip_grad_norm"], **extra)


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


def run_demo(out_dir: str | Path = "runs/demo", iters: int | None = None, *, minutes: float | None = None,
             data: str = "easy", model: str | None = None, threads: int | None = None, seed: int = 0,
             num_train: int | None = None, num_val: int | None = None, image_size: int | None = None,
             lr: float | None = None, batch_size: int | None = None, device: str = "cpu", pretrained: bool = False,
             backbone_checkpoint: str | Path | None = None, progress: bool = True, overlays: int = 6,
             eval_every: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole demo and write out_dir/{report.md, metrics.json, loss_curve.png, overlays/, model.safetensors,
    codec.safetensors (a model with a codec), run.json, data/, train/}.

    model: a preset with demo settings (istr.list_models(demo=True); default istr.models.default_model()).
    iters: training steps (default: the preset's demo settings; the same result on any machine); minutes: an
    optional wall-clock cap on top. data: "easy" (default) or "hard" (DEMO_DATA). threads: torch CPU threads
    (default: every core). device: where to train and evaluate ("cpu", "cuda", ...). The backbone starts from
    random weights unless `pretrained` (timm's ImageNet weights: needs the network) or `backbone_checkpoint` (a local
    timm-format file for the preset's backbone) is given; either uses the full-width backbone those weights are
    for. eval_every: also evaluate every N steps (the AP curve goes into metrics.json; training is unchanged).
    overwrite: remove an earlier demo's outputs (DEMO_OUTPUTS; its data/ is reused when it matches) once every input
    has been checked. Returns the metrics.json content.
    """
    from istr.codecs import MaskCodec
    from istr.data import make_synthetic_coco
    from istr.data.grids import coco_mask_grids
    from istr.engine.callbacks import StepTimer
    from istr.engine.evaluate import evaluate
    from istr.engine.rundir import RunDir
    from istr.engine.train import Trainer
    from istr.models import default_model
    from istr.viz import plot_loss_curve, save_overlays

    model = default_model() if model is None else model
    settings = demo_settings(model)
    if data not in DEMO_DATA:
        raise ValueError(f"data must be one of {sorted(DEMO_DATA)}, got {data!r}")
    iters = settings["train"]["iters"] if iters is None else int(iters)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    if backbone_checkpoint is not None and not Path(backbone_checkpoint).is_file():
        raise FileNotFoundError(f"no backbone checkpoint at {backbone_checkpoint}")
    if pretrained and backbone_checkpoint is not None:
        raise ValueError("pass either pretrained=True (timm's ImageNet weights) or backbone_checkpoint, not both")
    data_cfg = {**DEMO_DATA[data], **{k: v for k, v in (("num_train", num_train), ("num_val", num_val),
                                                         ("image_size", image_size)) if v is not None}}
    torch.set_num_threads(threads or os.cpu_count() or 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # every input is checked above: nothing is deleted for a run that cannot start
        RunDir(out).clear(DEMO_OUTPUTS)
    t_start = time.perf_counter()
    machine = machine_info()

    data_dir = out / "data"
    if _demo_data_settings(data_dir) != data_cfg:
        if data_dir.exists():
            shutil.rmtree(data_dir)
        print(f"generating the {data} synthetic dataset ({data_cfg['num_train']} train / {data_cfg['num_val']} val "
              f"images of {data_cfg['image_size']} px) in {data_dir}")
        make_synthetic_coco(data_dir, **data_cfg)
        (data_dir / "demo_data.json").write_text(json.dumps(data_cfg))
    train_ann = data_dir / "annotations" / "instances_train.json"
    val_ann = data_dir / "annotations" / "instances_val.json"
    t_data = time.perf_counter()

    train_cfg = {**settings["train"], **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None}}
    size = data_cfg["image_size"]
    model_cfg = {**settings["model"], "min_size": size, "max_size": size}
    overrides = dict(model_cfg)
    if pretrained or backbone_checkpoint is not None:  # the weights are for the preset's full-width backbone
        model_cfg.pop("timm_kwargs", None)
        overrides["timm_kwargs"] = None
    if pretrained:
        model_cfg["pretrained"] = overrides["pretrained"] = True
    if backbone_checkpoint is not None:
        model_cfg["checkpoint_path"] = overrides["checkpoint_path"] = str(backbone_checkpoint)
    net, train_set, val_set = build_demo_model(data_dir, model, overrides, train_cfg["flip"], seed)
    codec, codec_iou = getattr(net, "codec", None), None
    if isinstance(codec, MaskCodec):
        codec.save(out / "codec.safetensors")
        codec_iou = {"train": codec.reconstruction_iou(coco_mask_grids(train_ann, codec.mask_size)),
                     "val": codec.reconstruction_iou(coco_mask_grids(val_ann, codec.mask_size))}
        print(f"{type(codec).__name__} (l={codec.dim}, {codec.mask_size}x{codec.mask_size}) fitted on the training "
              f"masks: reconstruction IoU {codec_iou['val']:.3f} on validation masks")
    t_codec = time.perf_counter()

    cfg = demo_train_config(train_cfg, iters, max_minutes=minutes, seed=seed, checkpoint_every=0, log_every=10,
                            progress=progress, device=device, eval_at_end=False, eval_every=eval_every,
                            eval_kwargs={"progress": False})
    threads_text = f"{machine['torch_threads']} thread" + ("s" if machine["torch_threads"] != 1 else "")
    print(f"training {model} for {iters} steps of {cfg.batch_size} images ({threads_text}, "
          f"load average {machine.get('load_average_1m')})" + (f", at most {minutes:g} min" if minutes else ""))
    trainer = Trainer(net, train_set, cfg, val_dataset=val_set if eval_every else None, out_dir=out / "train",
                      callbacks=[StepTimer()], overwrite=True)
    cfg = trainer.cfg  # resolved: what the demo's settings leave unset comes from the preset's recipe
    result = trainer.train()
    t_train = time.perf_counter()

    metrics = evaluate(net, val_set, device=device, progress=False)
    t_eval = time.perf_counter()
    run = RunDir(out / "train")
    shutil.copyfile(run.model_file, out / "model.safetensors")
    RunDir(out).update_record(fresh=True, val_images=str((data_dir / "val").resolve()), val_ann=str(val_ann.resolve()))
    plot_loss_curve(run.log_file, out / "loss_curve.png")
    score_threshold = 0.4
    overlay_paths = save_overlays(net, val_set, out / "overlays", overlays, score_threshold)

    curve = [{"iter": r["iter"], "segm_AP": r["metrics"]["segm"]["AP"], "bbox_AP": r["metrics"]["bbox"]["AP"]}
             for r in run.read_log() if r.get("event") == "eval"]
    width = " (half width)" if model_cfg.get("timm_kwargs") else ""
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
        "model": {"preset": model, **model_cfg, "parameters": sum(p.numel() for p in net.parameters()),
                  "description": settings["description"].format(**{**net.config(), **model_cfg, "preset": model,
                                                                   "width": width})},
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


def _init_text(model: dict[str, Any]) -> str:
    if model.get("checkpoint_path"):
        return f"the backbone checkpoint `{model['checkpoint_path']}` (neck and head from random initialisation)"
    if model.get("pretrained"):
        return "timm's ImageNet backbone weights (neck and head from random initialisation)"
    return "random initialisation"


def _demo_data_settings(data_dir: Path) -> dict[str, Any] | None:
    """The settings the demo's data in data_dir was generated with, or None when there is none or its marker is
    unreadable (a garbled marker means the data is regenerated, not a traceback)."""
    try:
        return json.loads((data_dir / "demo_data.json").read_text())
    except (OSError, ValueError):
        return None


def _report_md(r: dict[str, Any]) -> str:
    """A short report of metrics.json (README's "The demo" explains the setting and how to read it)."""
    m, mach, d, t = r["metrics"], r["machine"], r["data"], r["train"]
    cols = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    fmt = lambda v: "n/a" if v is None or v < 0 else f"{100 * v:.1f}"  # noqa: E731
    rows = "\n".join(f"| {name} | " + " | ".join(fmt(m[key].get(c)) for c in cols) + " |"
                     for name, key in (("mask (segm)", "segm"), ("box (bbox)", "bbox")))
    overlays = "\n".join(f"![{Path(p).name}](overlays/{Path(p).name})" for p in r["files"]["overlays"])
    codec = r["codec_reconstruction_iou"]
    lines = [
        "# istr demo", "",
        f"{r['model']['description']}, {r['model']['parameters'] / 1e6:.1f} M parameters, on the {d['difficulty']} "
        f"synthetic shapes ({d['num_train']} training / {d['num_val']} validation images of {d['image_size']} px), "
        f"trained from {_init_text(r['model'])}.", "",
        f"| COCO AP (%) | {' | '.join(cols)} |", f"|---|{'---|' * len(cols)}", rows, "",
        *([f"Codec reconstruction IoU on validation masks: {codec['val']:.3f}.", ""] if codec else []),
        "| training | |", "|---|---|",
        f"| iterations | {r['iterations']} of {r['iters_requested']} requested ({r['stop_reason']}), batch "
        f"{t['batch_size']} |",
        f"| training time | {r['train_seconds']:.0f} s, {r['seconds_per_iter']:.3f} s per iteration |",
        f"| device | {t['device']} |",
        f"| optimizer | AdamW lr {t['lr']:g} (backbone x{t['backbone_lr_mult']:g}), weight decay {t['weight_decay']:g}, "
        f"warmup {t['warmup_iters']}, lr x{t['gamma']:g} at {t['milestones']}, grad clip {t['clip_grad_norm']} |",
        f"| evaluation, total | {r['eval_seconds']:.0f} s, {r['total_seconds']:.0f} s |",
        f"| machine | {mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']} |",
        f"| Load average (1 min) | {mach.get('load_average_1m')} at the start, {mach.get('load_average_1m_end')} at the "
        "end (above the core count: the CPU was shared, which slows the run but does not change its result) |", "",
        "![loss curve](loss_curve.png)", "",
        f"## Validation images (left: ground truth, right: prediction, score >= {r['score_threshold']})", "", overlays, "",
    ]
    return "\n".join(lines)
