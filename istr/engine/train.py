"""Training loop: TrainConfig (the paper's recipe as defaults), Trainer and train(); exact resume; DDP under torchrun."""
from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from istr.engine import checkpoint as ckpt
from istr.engine import distributed as dist_utils
from istr.engine.callbacks import Callback, PeriodicCheckpoint, PeriodicEvaluation, TimeBudget
from istr.engine.sampler import ResumableBatchSampler, SeededDataset
from istr.errors import NonFiniteError
from istr.io import save_model

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteLossError", "train", "warmup_multistep_factor"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(NonFiniteError):
    """Training met NaN/inf (an input image, a matching cost, a loss term, the gradient norm or the weights) and
    stopped; no checkpoint was written from the broken state."""


@dataclass
class TrainConfig:
    """Training hyper-parameters. Defaults are the paper's (v1) recipe: AdamW lr 2.5e-5, wd 1e-4 on every
    parameter, betas 0.9/0.999, linear warmup from 0.01 over 1000 iters, lr x0.1 at 210k and 250k of 270k iters,
    global grad-norm clip 1.0, 16 images per step (batch_size x accum_steps x world_size).

    An iteration is one optimizer step over `accum_steps` micro-batches of `batch_size` images per process.
    Training stops at `max_iters` or after `max_minutes` of wall time (whichever comes first; either may be None).
    lr_multipliers: {parameter-name substring: lr multiplier} for the head (e.g. ISDA's {"sampling_offsets": 0.1});
    None takes the model's own `lr_multipliers` attribute when it has one. backbone_lr_mult scales "backbone.*".

    Resuming applies a changed schedule, optimizer or bookkeeping setting exactly (logged as a "resume" event);
    it refuses changes of batch_size, accum_steps, seed and shuffle, which decide the data order and randomness
    of the run being continued.
    """

    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_mult: float = 1.0
    lr_multipliers: dict[str, float] | None = None
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
    elapsed_s: float  # training time, evaluation excluded (resumed runs: all segments)
    stop_reason: str  # "max_iters" | "time_budget" | a reason given to Trainer.stop
    last_losses: dict[str, float]
    checkpoint: str | None
    model_path: str | None
    metrics: dict[str, Any] | None = None
    eval_s: float = 0.0  # time spent evaluating, periodic and final


FIXED_ON_RESUME = ("batch_size", "accum_steps", "seed", "shuffle")
_RUN_FILES = ("log.jsonl", "model.safetensors", "train_result.json", "train_config.json", "checkpoints")


def _to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _default_collate(batch):
    from istr.data import collate_fn

    return collate_fn(batch)


class _IndexedCollate:
    """Collate (dataset index, sample) pairs: (indices, collate_fn(samples)), so errors can name the images."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch):
        return [i for i, _ in batch], self.collate_fn([sample for _, sample in batch])


class Trainer:
    """Trains a model: `model(images, targets)` returns a dict of scalar losses with "loss" (ISTR, ISDA, ...).

    Under torchrun (WORLD_SIZE > 1) the process group is joined from the environment, the model is wrapped in
    DistributedDataParallel, each rank reads its DistributedSampler share, and only rank 0 writes files.
    callbacks: istr.engine.callbacks.Callback objects (hooks at train start, step end and train end); the
    time budget, periodic checkpoints and evaluation of the config are such callbacks, installed first.
    out_dir must not hold a previous run unless it is resumed (resume()) or overwrite=True (which deletes it).
    SIGINT/SIGTERM finish the current step, write a checkpoint and then raise KeyboardInterrupt / SystemExit.
    Files in out_dir: log.jsonl (one JSON record per iteration: losses, lr, grad_norm, time; eval and other
    events too), checkpoints/iter_*/ (istr.engine.checkpoint), model.safetensors (final weights,
    istr.save_model), train_config.json, train_result.json.
    """

    def __init__(self, model: nn.Module, train_dataset: Sequence[Any], cfg: TrainConfig | None = None,
                 val_dataset: Sequence[Any] | None = None, out_dir: str | Path = "runs/train",
                 collate_fn: Callable | None = None, callbacks: Sequence[Callback] = (), overwrite: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if cfg is None:
            cfg = TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be istr.engine.callbacks.Callback objects, got {type(cb).__name__}")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.overwrite = bool(overwrite)
        self.dist = dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.val_dataset = val_dataset
        self.train_dataset = train_dataset
        _adopt_categories(model, train_dataset)
        self.callbacks: list[Callback] = [PeriodicCheckpoint(cfg.checkpoint_every), PeriodicEvaluation(cfg.eval_every)]
        if cfg.max_minutes is not None:
            self.callbacks.append(TimeBudget(cfg.max_minutes))
        self.callbacks += list(callbacks)

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
                                 collate_fn=_IndexedCollate(collate_fn or _default_collate),
                                 num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 # own generator: creating an iterator must not draw from the global RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed_before = 0.0
        self.eval_seconds = 0.0
        self.last_step_seconds = 0.0
        self.last_losses: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self.metrics: dict[str, Any] | None = None
        self._resumed = False
        self._stop_reason: str | None = None
        self._signal: int | None = None
        self._batch_indices: list[int] = []
        self._data_iter = None
        self._log_buffer: list[str] = []

    # ------------------------------------------------------------------------------------------------ setup
    def _lr_factor(self, iteration: int) -> float:
        c = self.cfg  # read at every step, so callbacks and resumes may move milestones
        return warmup_multistep_factor(iteration, c.warmup_iters, c.warmup_factor, c.milestones, c.gamma)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    def _lr_multipliers(self) -> dict[str, float]:
        mults = self.cfg.lr_multipliers
        return dict(getattr(self.module, "lr_multipliers", {}) if mults is None else mults)

    def _param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups, each {"params", "lr", "name"}: the head at lr, "backbone.*" at lr x backbone_lr_mult,
        and one group per lr_multipliers entry (the first matching substring wins)."""
        cfg, mults = self.cfg, self._lr_multipliers()
        groups: dict[str, dict[str, Any]] = {"head": {"params": [], "lr": cfg.lr, "name": "head"}}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            key = next((k for k in mults if k in name), None)
            if key is not None:
                group = groups.setdefault(key, {"params": [], "lr": cfg.lr * mults[key], "name": key})
            elif name.startswith("backbone."):
                group = groups.setdefault("backbone", {"params": [], "lr": cfg.lr * cfg.backbone_lr_mult,
                                                       "name": "backbone"})
            else:
                group = groups["head"]
            group["params"].append(p)
        return [g for g in groups.values() if g["params"]]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        groups = self._param_groups()
        if not groups:
            raise ValueError("the model has no trainable parameters")
        # weight decay on every parameter, norms and biases included (as the reference code). fused: one kernel
        # for all parameters instead of a dozen small ops per tensor (torch >= 2.4 on CPU too; same update rule)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=_fused_adamw_supported(self.device))

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def elapsed(self) -> float:
        """Training seconds so far (earlier segments of a resumed run included, evaluation excluded)."""
        run = time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0
        return self.elapsed_before + run - self.eval_seconds

    # ------------------------------------------------------------------------------------------------ callbacks' API
    def stop(self, reason: str = "callback") -> None:
        """Finish after the current step, with `reason` as the TrainResult's stop_reason."""
        self._stop_reason = reason

    def log(self, record: dict[str, Any]) -> None:
        """Append a JSON record to log.jsonl (rank 0; buffered, flushed with the next checkpoint or log_every)."""
        if self.is_main:
            self._log_buffer.append(json.dumps(record))

    _log = log

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights needed to continue exactly (RNG states of every rank included)."""
        rng = dist_utils.all_gather_object(ckpt.capture_rng_state())
        return {
            "iteration": self.iteration, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng, "world_size": self.dist.world_size, "config": _jsonable_config(self.cfg),
            "last_losses": dict(self.last_losses),
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current iteration (rank 0 writes; every rank takes part). Returns its path.
        Raises NonFiniteLossError, writing nothing, when the weights are not finite."""
        self._check_weights_finite()
        state = self.state_dict()  # collective: all ranks gather RNG states
        path = None
        if self.is_main:
            self._flush_log()
            path = ckpt.save_checkpoint(self.checkpoint_root, self.module, state, keep=self.cfg.keep_checkpoints)
            self.last_checkpoint = path
        dist_utils.barrier()
        self._saved_at = self.iteration
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from checkpoint `path` (a checkpoint dir) or, with None, from out_dir's newest one.

        Returns False when path is None and out_dir has no checkpoint. Raises CheckpointMismatchError if the
        checkpoint's model differs from this trainer's model, ValueError if batch_size, accum_steps, seed, shuffle
        or the world size differ from the checkpoint's run; other changed settings are applied exactly.
        """
        if path is None:
            path = ckpt.latest_checkpoint(self.checkpoint_root)
            if path is None:
                return False
        path = Path(path)
        state = ckpt.load_checkpoint(path, self.module, map_location=self.device)
        saved_cfg = state.get("config", {})
        fixed = [f"{k}: checkpoint {saved_cfg[k]!r} vs now {v!r}" for k, v in _jsonable_config(self.cfg).items()
                 if k in FIXED_ON_RESUME and k in saved_cfg and saved_cfg[k] != v]
        if int(state.get("world_size", 1)) != self.dist.world_size:
            fixed.append(f"world size: checkpoint {state.get('world_size')} vs now {self.dist.world_size}")
        if fixed:
            raise ValueError(f"cannot resume {path} with a different data order or randomness: {'; '.join(fixed)}. "
                             "Resume with the run's settings, or start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_losses = dict(state.get("last_losses", {}))
        changed = self._apply_config_changes(saved_cfg)
        ckpt.restore_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        self._data_iter = None
        self.last_checkpoint, self._saved_at, self._resumed = path, self.iteration, True
        if self.is_main:
            self._truncate_log(self.iteration)
        self.log({"iter": self.iteration, "event": "resume", "checkpoint": str(path), "changed": changed})
        logger.info("resumed from %s at iteration %d%s", path, self.iteration,
                    f"; applied changed settings {changed}" if changed else "")
        return True

    def _apply_config_changes(self, saved: dict[str, Any]) -> dict[str, list]:
        """Make the optimizer follow this config where it differs from the checkpoint's: base lrs (LambdaLR's
        base_lrs and each group's initial_lr), weight decay, betas, eps; the schedule reads cfg lazily. Returns
        {key: [checkpoint value, new value]} for every differing setting."""
        now = _jsonable_config(self.cfg)
        changed = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v}
        new_groups = self._param_groups()
        if [g["name"] for g in new_groups] != [g.get("name") for g in self.optimizer.param_groups]:
            raise ValueError("cannot resume: the optimizer's parameter groups differ from the checkpoint's "
                             "(lr_multipliers or backbone freezing changed)")
        cfg = self.cfg
        for group, new, i in zip(self.optimizer.param_groups, new_groups, range(len(new_groups))):
            group["initial_lr"] = new["lr"]
            self.scheduler.base_lrs[i] = new["lr"]
            group["lr"] = new["lr"] * self._lr_factor(self.iteration)
            group["weight_decay"], group["betas"], group["eps"] = cfg.weight_decay, cfg.betas, cfg.eps
        return changed

    # ------------------------------------------------------------------------------------------------ logging
    def _flush_log(self) -> None:
        if self.is_main and self._log_buffer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write("\n".join(self._log_buffer) + "\n")
            self._log_buffer.clear()

    def _truncate_log(self, iteration: int) -> None:
        """Drop log records written after `iteration` by an interrupted run (they will be redone), and a torn
        last line (a crash while writing it)."""
        log = self.out_dir / "log.jsonl"
        if not log.is_file():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                logger.warning("%s: dropped an unreadable line (torn by an interruption): %.80s", log, line)
                continue
            if record is not None and record.get("iter", 0) <= iteration:
                kept.append(line)
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)

    # ------------------------------------------------------------------------------------------------ checks
    def _check_run_dir(self) -> None:
        """Before any step: refuse to mix with a previous run in out_dir, and fail now if it is not writable."""
        if not self.is_main:
            return
        previous = [name for name in _RUN_FILES if (self.out_dir / name).exists()]
        if previous == ["checkpoints"] and not ckpt.list_checkpoints(self.checkpoint_root):
            previous = []
        if previous and not self._resumed:
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} holds a previous run ({', '.join(previous)}): resume it "
                                      "(resume=True, istr train --resume) or start over in it (overwrite=True, "
                                      "istr train --overwrite), or choose another output directory")
            for name in previous:
                target = self.out_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        for folder in (self.out_dir, self.checkpoint_root):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write_test_{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise PermissionError(f"cannot write training output to {folder}: {exc}") from None

    def _check_finite(self, losses: dict[str, torch.Tensor], what: str = "loss") -> None:
        tensors = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor)}
        finite = bool(torch.isfinite(torch.cat([v.detach().reshape(-1).float() for v in tensors.values()])).all())
        bad = [] if finite else sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
        flag = torch.tensor([1.0 if bad else 0.0], device=self.device)
        if float(dist_utils.all_reduce_sum(flag)) == 0:
            return
        if bad:
            terms = ", ".join(f"{k}={float(losses[k].detach().float().reshape(-1)[0]):g}" for k in bad)
        else:
            terms = "on another rank"
        self._non_finite(what, f"{terms}", bad)

    def _non_finite(self, what: str, detail: str, terms: list[str] | None = None) -> None:
        it = self.iteration + 1
        kept = self.last_checkpoint or ckpt.latest_checkpoint(self.checkpoint_root)
        msg = (f"non-finite {what} at iteration {it} (dataset indices {self._batch_indices}): {detail}. "
               "Training stopped; "
               + (f"the last good checkpoint {kept} (iteration {_ckpt_iter(kept)}) was kept unchanged."
                  if kept else "no checkpoint had been written yet.")
               + " Try a lower lr, a warmup, or check the data of these images.")
        self.log({"iter": it, "event": "non_finite", "what": what, "terms": terms or [],
                  "indices": self._batch_indices})
        self._flush_log()
        raise NonFiniteLossError(msg)

    def _check_weights_finite(self) -> None:
        norms = torch._foreach_norm([p.detach() for p in self.module.parameters()])
        if norms and not bool(torch.isfinite(torch.stack(norms)).all()):
            bad = [n for (n, _), v in zip(self.module.named_parameters(), norms) if not torch.isfinite(v)]
            self.iteration -= 1  # the step that broke the weights is the one reported
            self._non_finite("weights", f"{len(bad)} parameter tensors, e.g. {bad[:3]}", bad[:10])

    # ------------------------------------------------------------------------------------------------ loop
    def _next_batch(self):
        if self._data_iter is None:
            self.batch_sampler.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
            self._data_iter = iter(self.loader)
        try:
            indices, batch = next(self._data_iter)
        except StopIteration:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.batch_sampler.set_epoch(self.epoch)
            self._data_iter = iter(self.loader)
            indices, batch = next(self._data_iter)
        self.batch_in_epoch += 1
        self._batch_indices = [int(i) for i in indices]
        return batch

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
                try:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        losses = self.model(images, targets)
                except NonFiniteError as exc:  # a NaN image, or NaN predictions reaching the matcher
                    self._non_finite("input or prediction", str(exc))
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

    def evaluate(self) -> dict[str, Any] | None:
        """COCO-evaluate on val_dataset (every rank runs its shard; rank 0 logs) without disturbing any RNG state.
        Its time counts as evaluation time, not training time."""
        if self.val_dataset is None:
            return None
        from istr.engine.evaluate import evaluate

        t0 = time.perf_counter()
        kwargs = {"progress": self.cfg.progress, **self.cfg.eval_kwargs}
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            was_training = self.module.training
            try:
                metrics = evaluate(self.module, self.val_dataset, device=self.device, **kwargs)
            finally:
                self.module.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
        self.eval_seconds += time.perf_counter() - t0
        self.metrics, self._evaluated_at = metrics, self.iteration
        self.log({"iter": self.iteration, "event": "eval", "metrics": metrics})
        self._flush_log()
        if self.is_main:
            logger.info("iter %d  eval %s", self.iteration,
                        "  ".join(f"{k} AP {100 * v.get('AP', float('nan')):.1f}" for k, v in metrics.items()
                                  if isinstance(v, dict)))
        return metrics

    def _stop_requested(self) -> bool:
        """Whether to stop after this step (any rank's signal or stop() counts; all ranks agree)."""
        flags = torch.tensor([float(self._signal is not None), float(self._stop_reason is not None)],
                             device=self.device)
        flags = dist_utils.all_reduce_sum(flags)
        if flags[0] > 0 and self._signal is None:
            self._signal = signal.SIGTERM
        if flags[1] > 0 and self._stop_reason is None:
            self._stop_reason = dist_utils.broadcast_object(self._stop_reason) or "callback"
        return bool(flags.sum() > 0)

    def train(self) -> TrainResult:
        """Run until max_iters, the time budget or a callback's stop(); returns a TrainResult. Rank 0 writes out_dir."""
        cfg = self.cfg
        self._check_run_dir()
        _check_dataset_files(self.train_dataset)
        if self.is_main:
            (self.out_dir / "train_config.json").write_text(json.dumps(_jsonable_config(cfg), indent=2))
        self._t_start, self.eval_seconds = time.perf_counter(), 0.0
        self._saved_at = self.iteration if self.last_checkpoint is not None else -1
        self._evaluated_at = -1
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_iters, initial=self.iteration, desc="train", dynamic_ncols=True)
        for cb in self.callbacks:
            cb.on_train_start(self)
        try:
            with _deferred_signals(self):
                while cfg.max_iters is None or self.iteration < cfg.max_iters:
                    t0 = time.perf_counter()
                    losses = self.train_step()
                    self.last_step_seconds = time.perf_counter() - t0
                    self.iteration += 1
                    self.last_losses = losses
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log({"iter": self.iteration, "lr": lr, **losses, "iter_time": round(self.last_step_seconds, 4),
                              "time": round(self.elapsed, 3), "epoch": self.epoch})
                    if cfg.log_every and self.iteration % cfg.log_every == 0:
                        self._flush_log()
                        logger.info("iter %d  loss %.4f  lr %.3g  %.2fs/it", self.iteration, losses["loss"], lr,
                                    self.last_step_seconds)
                        if bar is not None:
                            bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2g}")
                    if bar is not None:
                        bar.update(1)
                    for cb in self.callbacks:
                        cb.on_step_end(self, losses)
                    if self._stop_requested():
                        break
        finally:
            if bar is not None:
                bar.close()
            self._flush_log()
        if self._signal is not None:
            self._interrupted()
        stop_reason = self._stop_reason or "max_iters"
        if self._saved_at != self.iteration and (cfg.checkpoint_every or cfg.max_minutes is not None):
            self.save_checkpoint()
        model_path = None
        if self.is_main:
            model_path = self.out_dir / "model.safetensors"
            save_model(self.module, model_path)
        if cfg.eval_at_end and self.val_dataset is not None and self._evaluated_at != self.iteration:
            self.evaluate()
        for cb in self.callbacks:
            cb.on_train_end(self)
        result = TrainResult(iterations=self.iteration, elapsed_s=round(self.elapsed, 3), stop_reason=stop_reason,
                             last_losses=self.last_losses,
                             checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                             model_path=str(model_path) if model_path else None, metrics=self.metrics,
                             eval_s=round(self.eval_seconds, 3))
        if self.is_main:
            (self.out_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2, default=str))
        return result

    def _interrupted(self) -> None:
        """After SIGINT/SIGTERM: checkpoint the last finished step, then leave as the signal asked."""
        signum = self._signal
        if self._saved_at != self.iteration:
            self.save_checkpoint()
        self.log({"iter": self.iteration, "event": "interrupted", "signal": int(signum)})
        self._flush_log()
        logger.warning("interrupted by signal %d: checkpoint of iteration %d in %s", signum, self.iteration,
                       self.last_checkpoint)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum))


@contextlib.contextmanager
def _deferred_signals(trainer: Trainer):
    """SIGINT/SIGTERM set trainer._signal (the loop checkpoints and leaves after the step); a second one acts at
    once. Only the main thread can install handlers; elsewhere signals keep their default behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        trainer._signal = signum
        for s, h in previous.items():  # a second signal is not deferred
            signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _adopt_categories(model: nn.Module, dataset: Any) -> None:
    """Give the model the dataset's label -> category mapping (saved with it), refusing a different one."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    ids, names = getattr(base, "label_to_category_id", None), getattr(base, "category_names", None)
    if ids is None or names is None or not hasattr(model, "categories"):
        return
    categories = [{"id": int(i), "name": str(n)} for i, n in zip(ids, names)]
    num_classes = getattr(model, "num_classes", len(categories))
    if num_classes != len(categories):
        raise ValueError(f"the model predicts {num_classes} classes but the training set has {len(categories)} "
                         f"categories: build it with num_classes={len(categories)}")
    if model.categories is not None and model.categories != categories:
        raise ValueError("the model's categories differ from the training set's: "
                         f"model {model.categories[:3]}... vs data {categories[:3]}...")
    model.categories = categories


def _check_dataset_files(dataset: Any) -> None:
    """Let a dataset that can check its files (CocoInstances.check_files) do so before the first step."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    indices = list(dataset.indices) if isinstance(dataset, Subset) else None
    check = getattr(base, "check_files", None)
    if callable(check):
        check(indices)


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
          callbacks: Sequence[Callback] = (), overwrite: bool = False) -> TrainResult:
    """Train `model` on `train_dataset` ((image [3,H,W] float in [0,1], target dict) pairs) following `cfg`.

    resume: False (start fresh), True (continue from out_dir's newest checkpoint if there is one), or a
    checkpoint directory. overwrite: start fresh in an out_dir that holds a previous run (deleting it).
    Returns a TrainResult; see Trainer for the files written to out_dir.
    """
    trainer = Trainer(model, train_dataset, cfg, val_dataset=val_dataset, out_dir=out_dir, collate_fn=collate_fn,
                      callbacks=callbacks, overwrite=overwrite)
    if resume is True:
        trainer.resume(None)
    elif resume:
        trainer.resume(resume)
    return trainer.train()
