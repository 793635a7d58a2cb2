"""Training loop: TrainConfig (the paper's recipe as defaults), Trainer and train(); exact resume; DDP under torchrun."""
from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from istr.engine import checkpoint as ckpt
from istr.engine import distributed as dist_utils
from istr.engine.sampler import ResumableBatchSampler, SeededDataset

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteLossError", "train", "warmup_multistep_factor"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the gradient norm) became NaN/inf; training stopped without writing a checkpoint."""


@dataclass
class TrainConfig:
    """Training hyper-parameters. Defaults are the paper's (v1) recipe: AdamW lr 2.5e-5, wd 1e-4 on every
    parameter, betas 0.9/0.999, linear warmup from 0.01 over 1000 iters, lr x0.1 at 210k and 250k of 270k iters,
    global grad-norm clip 1.0, 16 images per step (batch_size x accum_steps x world_size).

    An iteration is one optimizer step over `accum_steps` micro-batches of `batch_size` images per process.
    Training stops at `max_iters` or after `max_minutes` of wall time (whichever comes first; either may be None).
    """

    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_mult: float = 1.0
    batch_size: int = 16
    accum_steps: int = 1
    max_iters: int | None = 270_000
    max_minutes: float | None = None
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (210_000, 250_000)
    gamma: float = 0.1
    clip_grad_norm: float | None = 1.0
    bf16: bool = False
    seed: int = 40244023
    shuffle: bool = True
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 0
    eval_at_end: bool = True
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    progress: bool = True
    find_unused_parameters: bool = False
    eval_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.milestones = tuple(int(m) for m in self.milestones)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("batch_size", "accum_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters is None and self.max_minutes is None:
            raise ValueError("set max_iters and/or max_minutes; with neither, training would never stop")
        if self.max_iters is not None and self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0 or None, got {self.max_iters}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_workers", "warmup_iters"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def warmup_multistep_factor(iteration: int, warmup_iters: int, warmup_factor: float,
                            milestones: Sequence[int], gamma: float) -> float:
    """LR multiplier after `iteration` completed steps: linear warmup from warmup_factor, x gamma per milestone."""
    factor = gamma ** bisect.bisect_right(list(milestones), iteration)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


@dataclass
class TrainResult:
    """What a finished train() returns (also written to out_dir/train_result.json)."""

    iterations: int
    elapsed_s: float
    stop_reason: str  # "max_iters" | "time_budget"
    last_losses: dict[str, float]
    checkpoint: str | None
    model_path: str | None
    metrics: dict[str, Any] | None = None


def _to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _default_collate(batch):
    from istr.data import collate_fn

    return collate_fn(batch)


class Trainer:
    """Trains an ISTR-style model: `model(images, targets)` returns a dict of scalar losses with "loss".

    Under torchrun (WORLD_SIZE > 1) the process group is joined from the environment, the model is wrapped in
    DistributedDataParallel, each rank reads its DistributedSampler share, and only rank 0 writes files.
    callbacks: functions called as cb(trainer, losses) after every iteration (losses: the logged floats); they may
    change trainer.cfg.max_iters / milestones (the lr schedule reads cfg when it steps), e.g. to fit a schedule
    into a time budget once the speed is known.
    Files in out_dir: log.jsonl (one JSON record per iteration: losses, lr, grad_norm, time; eval records too),
    checkpoints/iter_*/ (see istr.engine.checkpoint), model.safetensors (final weights via istr.save_model),
    train_result.json.
    """

    def __init__(self, model: nn.Module, train_dataset: Sequence[Any], cfg: TrainConfig | None = None,
                 val_dataset: Sequence[Any] | None = None, out_dir: str | Path = "runs/train",
                 collate_fn: Callable | None = None,
                 callbacks: Sequence[Callable[["Trainer", dict[str, float]], None]] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if cfg is None:
            cfg = TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist = dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.val_dataset = val_dataset
        self.train_dataset = train_dataset
        self.callbacks = list(callbacks)

        self._seed_everything(cfg.seed + self.dist.rank)
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.dist.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.batch_sampler = ResumableBatchSampler(len(train_dataset), cfg.batch_size, seed=cfg.seed,
                                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                                   shuffle=cfg.shuffle, drop_last=True)
        self.loader = DataLoader(SeededDataset(train_dataset), batch_sampler=self.batch_sampler,
                                 collate_fn=collate_fn or _default_collate, num_workers=cfg.num_workers,
                                 persistent_workers=cfg.num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 # own generator: creating an iterator must not draw from the global RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed_before = 0.0
        self.last_losses: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self._data_iter = None
        self._log_buffer: list[str] = []

    # ------------------------------------------------------------------------------------------------ setup
    def _lr_factor(self, iteration: int) -> float:
        c = self.cfg  # read at every step, so callbacks may move milestones
        return warmup_multistep_factor(iteration, c.warmup_iters, c.warmup_factor, c.milestones, c.gamma)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        backbone, rest = [], []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                (backbone if name.startswith("backbone.") else rest).append(p)
        if not backbone and not rest:
            raise ValueError("the model has no trainable parameters")
        groups = [{"params": rest, "lr": cfg.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
        # weight decay on every parameter, norms and biases included (as the reference code). fused: one kernel
        # for all parameters instead of a dozen small ops per tensor (torch >= 2.4 on CPU too; same update rule)
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=_fused_adamw_supported(self.device))

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights needed to continue exactly (RNG states of every rank included)."""
        rng = dist_utils.all_gather_object(ckpt.capture_rng_state())
        return {
            "iteration": self.iteration, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed_before + self._run_elapsed(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng, "world_size": self.dist.world_size, "config": _jsonable_config(self.cfg),
            "last_losses": dict(self.last_losses),
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current iteration (rank 0 writes; every rank takes part). Returns its path."""
        state = self.state_dict()  # collective: all ranks gather RNG states
        path = None
        if self.is_main:
            self._flush_log()
            path = ckpt.save_checkpoint(self.checkpoint_root, self.module, state, keep=self.cfg.keep_checkpoints)
            self.last_checkpoint = path
        dist_utils.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from checkpoint `path` (a checkpoint dir) or, with None, from out_dir's newest one.

        Returns False when path is None and out_dir has no checkpoint. Raises CheckpointMismatchError if the
        checkpoint's model differs from this trainer's model.
        """
        if path is None:
            path = ckpt.latest_checkpoint(self.checkpoint_root)
            if path is None:
                return False
        path = Path(path)
        state = ckpt.load_checkpoint(path, self.module, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_losses = dict(state.get("last_losses", {}))
        rng = state["rng"]
        if int(state.get("world_size", 1)) != self.dist.world_size:
            logger.warning("checkpoint %s was written with world size %s, resuming with %s: data order and "
                           "randomness will differ from an uninterrupted run", path, state.get("world_size"),
                           self.dist.world_size)
        ckpt.restore_rng_state(rng[self.dist.rank % len(rng)])
        self._data_iter = None
        self.last_checkpoint = path
        if self.is_main:
            self._truncate_log(self.iteration)
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    # ------------------------------------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self._log_buffer.append(json.dumps(record))

    def _flush_log(self) -> None:
        if self.is_main and self._log_buffer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write("\n".join(self._log_buffer) + "\n")
            self._log_buffer.clear()

    def _truncate_log(self, iteration: int) -> None:
        """Drop log records written after `iteration` by an interrupted run (they will be redone)."""
        log = self.out_dir / "log.jsonl"
        if not log.is_file():
            return
        kept = [line for line in log.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= iteration]
        log.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------------------ loop
    def _next_batch(self):
        if self._data_iter is None:
            self.batch_sampler.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
            self._data_iter = iter(self.loader)
        try:
            batch = next(self._data_iter)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.batch_sampler.set_epoch(self.epoch)
            self._data_iter = iter(self.loader)
            batch = next(self._data_iter)
        self.batch_in_epoch += 1
        return batch

    def _run_elapsed(self) -> float:
        return time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0

    def _check_finite(self, losses: dict[str, torch.Tensor], what: str = "loss") -> None:
        bad = sorted(k for k, v in losses.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all())
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        any_bad = float(dist_utils.all_reduce_sum(flag)) > 0
        if not any_bad:
            return
        it = self.iteration + 1
        if bad:
            terms = ", ".join(f"{k}={float(losses[k].detach().float().reshape(-1)[0]):g}" for k in bad)
        else:
            terms = "on another rank"
        kept = self.last_checkpoint or ckpt.latest_checkpoint(self.checkpoint_root)
        msg = (f"non-finite {what} at iteration {it}: {terms}. Training stopped; "
               + (f"the last good checkpoint {kept} (iteration {_ckpt_iter(kept)}) was kept unchanged."
                  if kept else "no checkpoint had been written yet.")
               + " Try a lower lr, a warmup, or check the data of this iteration.")
        self._log({"iter": it, "event": "non_finite", "what": what, "terms": bad})
        self._flush_log()
        raise NonFiniteLossError(msg)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over accum_steps micro-batches. Gradients stay in p.grad until the next step."""
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for k in range(cfg.accum_steps):
            images, targets = self._next_batch()
            images, targets = _to_device(images, targets, self.device)
            sync = (self.model.no_sync() if isinstance(self.model, nn.parallel.DistributedDataParallel)
                    and k < cfg.accum_steps - 1 else contextlib.nullcontext())
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    losses = self.model(images, targets)
                if not isinstance(losses, dict) or "loss" not in losses:
                    raise TypeError("in train mode the model must return a dict of losses containing 'loss', got "
                                    f"{type(losses).__name__}" + (f" with keys {sorted(losses)}" if isinstance(losses, dict) else ""))
                self._check_finite(losses)
                (losses["loss"].float() / cfg.accum_steps).backward()
            for name, value in losses.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / cfg.accum_steps
        params = [p for p in self.module.parameters() if p.grad is not None]
        if cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])) \
                if params else torch.zeros(())
        self._check_finite({"grad_norm": grad_norm}, what="gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        names = sorted(totals)
        values = dist_utils.all_reduce_mean(torch.stack([totals[n] for n in names])) if names else torch.zeros(0)
        out = {n: float(v) for n, v in zip(names, values.tolist())}
        out["grad_norm"] = float(grad_norm)
        return out

    def _time_left(self, iter_time: float) -> bool:
        if self.cfg.max_minutes is None:
            return True
        budget = self.cfg.max_minutes * 60.0
        elapsed = self.elapsed_before + self._run_elapsed()
        go = elapsed + 0.5 * iter_time < budget
        return bool(dist_utils.broadcast_object(go))

    def evaluate(self) -> dict[str, Any] | None:
        """COCO-evaluate on val_dataset (every rank runs its shard; rank 0 logs) without disturbing any RNG state."""
        if self.val_dataset is None:
            return None
        from istr.engine.evaluate import evaluate

        kwargs = {"progress": False, **self.cfg.eval_kwargs}
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            was_training = self.module.training
            try:
                metrics = evaluate(self.module, self.val_dataset, device=self.device, **kwargs)
            finally:
                self.module.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
        self._log({"iter": self.iteration, "event": "eval", "metrics": metrics})
        self._flush_log()
        if self.is_main:
            logger.info("iter %d  eval %s", self.iteration,
                        "  ".join(f"{k} AP {v.get('AP', float('nan')):.4f}" for k, v in metrics.items()
                                  if isinstance(v, dict)))
        return metrics

    def train(self) -> TrainResult:
        """Run until max_iters or the time budget; returns a TrainResult. Rank 0 writes out_dir."""
        cfg = self.cfg
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(_jsonable_config(cfg), indent=2))
        self._t_start = time.perf_counter()
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True)
        stop_reason, iter_time, metrics = "max_iters", 0.0, None
        saved_at = self.iteration if self.last_checkpoint is not None else -1
        try:
            while cfg.max_iters is None or self.iteration < cfg.max_iters:
                if not self._time_left(iter_time):
                    stop_reason = "time_budget"
                    break
                t0 = time.perf_counter()
                losses = self.train_step()
                iter_time = time.perf_counter() - t0
                self.iteration += 1
                self.last_losses = losses
                lr = self.optimizer.param_groups[0]["lr"]
                self._log({"iter": self.iteration, "lr": lr, **losses, "iter_time": round(iter_time, 4),
                           "time": round(self.elapsed_before + self._run_elapsed(), 3), "epoch": self.epoch})
                if cfg.log_every and self.iteration % cfg.log_every == 0:
                    self._flush_log()
                    logger.info("iter %d  loss %.4f  lr %.3g  %.2fs/it", self.iteration, losses["loss"], lr, iter_time)
                    if bar is not None:
                        bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2g}")
                if bar is not None:
                    bar.update(1)
                for callback in self.callbacks:
                    callback(self, losses)
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.iteration
                if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                    metrics = self.evaluate()
        finally:
            if bar is not None:
                bar.close()
            self._flush_log()
        if saved_at != self.iteration and (cfg.checkpoint_every or cfg.max_minutes is not None):
            self.save_checkpoint()
        model_path = None
        if self.is_main:
            model_path = self.out_dir / "model.safetensors"
            ckpt.save_weights(self.module, model_path)
        if cfg.eval_at_end and self.val_dataset is not None and not (cfg.eval_every and self.iteration % cfg.eval_every == 0):
            metrics = self.evaluate()
        result = TrainResult(iterations=self.iteration, elapsed_s=round(self.elapsed_before + self._run_elapsed(), 3),
                             stop_reason=stop_reason, last_losses=self.last_losses,
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             model_path=str(model_path) if model_path else None, metrics=metrics)
        if self.is_main:
            (self.out_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2, default=str))
        return result


def _fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel exists for this device (CPU since torch 2.4; CUDA; not MPS before 2.5)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def _ckpt_iter(path: Path | None) -> str:
    try:
        return str(int(Path(path).name.split("_")[-1]))
    except (TypeError, ValueError):
        return "?"


def _jsonable_config(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=repr))


def train(model: nn.Module, train_dataset: Sequence[Any], cfg: TrainConfig | None = None,
          val_dataset: Sequence[Any] | None = None, out_dir: str | Path = "runs/train",
          resume: bool | str | Path = False, collate_fn: Callable | None = None,
          callbacks: Sequence[Callable[[Trainer, dict[str, float]], None]] = ()) -> TrainResult:
    """Train `model` on `train_dataset` ((image [3,H,W] float in [0,1], target dict) pairs) following `cfg`.

    resume: False (start fresh), True (continue from out_dir's newest checkpoint if there is one), or a
    checkpoint directory. Returns a TrainResult; see Trainer for the files written to out_dir.
    """
    trainer = Trainer(model, train_dataset, cfg, val_dataset=val_dataset, out_dir=out_dir, collate_fn=collate_fn,
                      callbacks=callbacks)
    if resume is True:
        trainer.resume(None)
    elif resume:
        trainer.resume(resume)
    return trainer.train()
