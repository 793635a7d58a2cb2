"""The train loop: Trainer (model, data order, optimizer step, lr schedule, grad clip, finite checks, exact resume).

Over 400 lines as one job: the Trainer class is the loop and the state that makes it resumable exactly (what a
checkpoint holds and how a resume restores and checks it must be read next to the step that produces it).
What happens around the steps (log file, progress bar, signals, periodic checkpoints and evaluations, the time
budget, the end of the run, checkpoints on errors) is done by hooks: istr.engine.hooks and istr.engine.callbacks.
The run folder's layout and its writer lock belong to istr.engine.rundir.RunDir.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from istr.engine import checkpoint as ckpt
from istr.engine.checkpoint import checkpoint_bytes
from istr.engine import distributed as dist_utils
from istr.engine import hooks as run_hooks
from istr.engine.callbacks import Callback, PeriodicCheckpoint, PeriodicEvaluation, TimeBudget
from istr.engine.config import FIXED_ON_RESUME, TrainConfig, config_dict, resolve_config
from istr.engine.fingerprint import compare_fingerprints, dataset_fingerprint
from istr.engine.optim import build_optimizer, build_scheduler, param_groups
from istr.engine.rundir import RunDir, write_error
from istr.engine.sampler import ResumableBatchSampler, SeededDataset
from istr.engine.train_data import (IndexedCollate, adopt_categories, check_dataset_files, default_collate, to_device,
                                    val_paths)
from istr.errors import NonFiniteError
from istr.io import save_model

__all__ = ["Trainer", "TrainResult", "NonFiniteLossError"]

logger = logging.getLogger("istr.engine.train")


class NonFiniteLossError(NonFiniteError):
    """Training met NaN/inf (an input image, a matching cost, a loss term, the gradient norm or the weights) and
    stopped; no checkpoint was written from the broken state."""


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


class Trainer:
    """Trains a model: `model(images, targets)` returns a dict of scalar losses with "loss" (any family).

    Under torchrun (WORLD_SIZE > 1) the process group is joined from the environment, the model is wrapped in
    DistributedDataParallel, each rank reads its DistributedSampler share, and only rank 0 writes files.
    cfg: a TrainConfig; its recipe fields left None come from the model's recipe (`model.recipe`), else the
    library defaults (istr.engine.config.resolve_config); `trainer.cfg` is the resolved copy.
    callbacks: istr.engine.callbacks.Callback objects (hooks at train start, step end, train end and on an
    exception); the run's own hooks (istr.engine.hooks) and the config's time budget, periodic checkpoints and
    evaluation are installed first.
    out_dir must not hold a previous run unless it is resumed (resume()) or overwrite=True (which deletes it);
    one process at a time writes it (RunDir.lock: a second writer gets RunLockedError).
    SIGINT/SIGTERM finish the current step, write a checkpoint and then raise KeyboardInterrupt / SystemExit;
    any other exception that ends training first checkpoints the last finished step.
    Files in out_dir: see istr.engine.rundir (log.jsonl, checkpoints/, model.safetensors, run.json, ...).
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
        recipe = getattr(model, "recipe", None) or {}
        self.recipe = {"preset": getattr(model, "preset", None), "values": dict(recipe)}
        self.cfg, self.config_sources = resolve_config(cfg, recipe)
        self.rundir = RunDir(out_dir)
        self.out_dir = self.rundir.root
        self.overwrite = bool(overwrite)
        self.dist = dist_utils.init_distributed(self.cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.val_dataset = val_dataset
        self.train_dataset = train_dataset
        adopt_categories(model, train_dataset)
        cfg = self.cfg
        self.hooks: list[Callback] = [run_hooks.LogWriter(), run_hooks.ProgressBar(), run_hooks.SignalHandler(),
                                      run_hooks.EndOfRun(), run_hooks.CheckpointOnError(),
                                      PeriodicCheckpoint(cfg.checkpoint_every), PeriodicEvaluation(cfg.eval_every)]
        if cfg.max_minutes is not None:
            self.hooks.append(TimeBudget(cfg.max_minutes))
        self.hooks += list(callbacks)

        self._seed_everything(cfg.seed + self.dist.rank)
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.dist.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.optimizer = build_optimizer(self.module, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, lambda: self.cfg)
        self.batch_sampler = ResumableBatchSampler(len(train_dataset), cfg.batch_size, seed=cfg.seed,
                                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                                   shuffle=cfg.shuffle, drop_last=True)
        self.loader = DataLoader(SeededDataset(train_dataset), batch_sampler=self.batch_sampler,
                                 collate_fn=IndexedCollate(collate_fn or default_collate),
                                 num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                 pin_memory=self.device.type == "cuda",
                                 # own generator: creating an iterator must not draw from the global RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))
        self.data_fingerprint = dataset_fingerprint(train_dataset)
        self.iteration = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed_before = 0.0
        self.eval_seconds = 0.0
        self.last_step_seconds = 0.0
        self.last_losses: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        self.model_path: Path | None = None
        self.metrics: dict[str, Any] | None = None
        self.pending_signal: int | None = None
        self.saved_at = -1
        self.evaluated_at = -1
        self._resumed = False
        self._stop_reason: str | None = None
        self._batch_indices: list[int] = []
        self._data_iter = None
        self._log_buffer: list[str] = []
        self._step_start: tuple[int, int, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _seed_everything(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    @property
    def callbacks(self) -> list[Callback]:
        """Every hook, in calling order (the run's own, then the config's, then the user's)."""
        return self.hooks

    @property
    def checkpoint_root(self) -> Path:
        return self.rundir.checkpoints

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

    def flush_log(self) -> None:
        """Write the buffered log records (rank 0)."""
        if self.is_main and self._log_buffer:
            self.rundir.append_log(self._log_buffer)
            self._log_buffer.clear()

    _flush_log = flush_log

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything but the model weights needed to continue exactly (RNG states of every rank included)."""
        rng = dist_utils.all_gather_object(ckpt.capture_rng_state())
        return {
            "iteration": self.iteration, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng, "world_size": self.dist.world_size, "config": config_dict(self.cfg),
            "last_losses": dict(self.last_losses), "data": json.dumps(self.data_fingerprint),
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current iteration (rank 0 writes; every rank takes part). Returns its path.
        Raises NonFiniteLossError, writing nothing, when the weights are not finite."""
        self._check_weights_finite()
        state = self.state_dict()  # collective: all ranks gather RNG states
        path = None
        if self.is_main:
            self.flush_log()
            path = ckpt.save_checkpoint(self.checkpoint_root, self.module, state, keep=self.cfg.keep_checkpoints)
            self.last_checkpoint = path
        dist_utils.barrier()
        self.saved_at = self.iteration
        return path

    def save_model(self) -> Path | None:
        """Write the final weights to RUN/model.safetensors (rank 0; other ranks return None)."""
        if not self.is_main:
            return None
        path = self.rundir.model_file
        try:
            save_model(self.module, path)
        except Exception as exc:  # a full disk: the temporary file is gone; say where and how much
            failure = write_error(path, checkpoint_bytes(self.module, {}), exc)
            if failure is None:
                raise
            raise failure from exc
        return path

    def rewind_step(self) -> None:
        """Undo the bookkeeping of a step that failed part-way (data order position and RNG state), so a checkpoint
        written now continues exactly after the last finished step."""
        if self._step_start is not None:
            self.epoch, self.batch_in_epoch, rng = self._step_start
            ckpt.restore_rng_state(rng)
            self._data_iter = None

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from checkpoint `path` (a checkpoint dir) or, with None, from out_dir's newest one.

        Returns False when path is None and out_dir has no checkpoint. Raises CheckpointMismatchError if the
        checkpoint's model differs from this trainer's model, ValueError if batch_size, accum_steps, seed, shuffle,
        the world size or the training data (annotation file, image list) differ from the checkpoint's run;
        other changed settings are applied exactly. Takes the run folder's writer lock (RunLockedError when a live
        process writes it) before touching anything.
        """
        acquired = self.is_main and not self.rundir.locked
        if self.is_main:
            self.rundir.lock()
        try:
            return self._resume(path)
        except BaseException:
            if acquired:
                self.rundir.unlock()
            raise

    def _resume(self, path: str | Path | None) -> bool:
        if path is None:
            path = self.rundir.latest_checkpoint()
            if path is None:
                return False
        path = Path(path)
        state = ckpt.load_checkpoint(path, self.module, map_location=self.device)
        saved_cfg = state.get("config", {})
        now = config_dict(self.cfg)
        fixed = [f"{k}: checkpoint {saved_cfg[k]!r} vs now {v!r}" for k, v in now.items()
                 if k in FIXED_ON_RESUME and k in saved_cfg and saved_cfg[k] != v]
        if int(state.get("world_size", 1)) != self.dist.world_size:
            fixed.append(f"world size: checkpoint {state.get('world_size')} vs now {self.dist.world_size}")
        if "data" in state:
            fixed += compare_fingerprints(json.loads(state["data"]), self.data_fingerprint)
        if fixed:
            raise ValueError(f"cannot resume {path} with a different data order or randomness: {'; '.join(fixed)}. "
                             "Resume with the run's settings and data, or start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration, self.epoch = int(state["iteration"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_losses = dict(state.get("last_losses", {}))
        changed = self._apply_config_changes(saved_cfg)
        ckpt.restore_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        self._data_iter = None
        self.last_checkpoint, self.saved_at, self._resumed = path, self.iteration, True
        if self.is_main:
            self.rundir.truncate_log(self.iteration)
        self.log({"iter": self.iteration, "event": "resume", "checkpoint": str(path), "changed": changed})
        logger.info("resumed from %s at iteration %d%s", path, self.iteration,
                    f"; applied changed settings {changed}" if changed else "")
        return True

    def _apply_config_changes(self, saved: dict[str, Any]) -> dict[str, list]:
        """Make the optimizer follow this config where it differs from the checkpoint's: base lrs (LambdaLR's
        base_lrs and each group's initial_lr), weight decay, betas, eps; the schedule reads cfg lazily. Returns
        {key: [checkpoint value, new value]} for every differing setting."""
        now = config_dict(self.cfg)
        changed = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v}
        new_groups = param_groups(self.module, self.cfg)
        if [g["name"] for g in new_groups] != [g.get("name") for g in self.optimizer.param_groups]:
            raise ValueError("cannot resume: the optimizer's parameter groups differ from the checkpoint's "
                             "(lr_multipliers or backbone freezing changed)")
        cfg = self.cfg
        for i, (group, new) in enumerate(zip(self.optimizer.param_groups, new_groups)):
            group["initial_lr"] = new["lr"]
            self.scheduler.base_lrs[i] = new["lr"]
            group["lr"] = new["lr"] * self.scheduler.lr_lambdas[0](self.iteration)
            group["weight_decay"], group["betas"], group["eps"] = cfg.weight_decay, cfg.betas, cfg.eps
        return changed

    # ------------------------------------------------------------------------------------------------ checks
    def _prepare_run_dir(self) -> None:
        """Before any step (rank 0): take the writer lock, refuse to mix with a previous run in out_dir (or delete
        it with overwrite=True), fail now if it is not writable, and write the run record."""
        if not self.is_main:
            return
        self.rundir.prepare(resumed=self._resumed, overwrite=self.overwrite)
        self.rundir.write_json(self.rundir.config_file, config_dict(self.cfg))
        record = {"config": config_dict(self.cfg), "config_sources": self.config_sources, "recipe": self.recipe,
                  "train_data": self.data_fingerprint, **val_paths(self.val_dataset)}
        self.rundir.update_record(fresh=not self._resumed, **record)

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
        kept = self.last_checkpoint or self.rundir.latest_checkpoint()
        problem = RunDir.checkpoint_problem(kept) if kept is not None and self.is_main else None
        if kept is None:
            saved = "no checkpoint had been written yet."
        elif problem is None:
            saved = f"the last good checkpoint {kept} (iteration {RunDir.checkpoint_iteration(kept)}) was kept unchanged."
        else:
            saved = f"the last checkpoint {kept} is damaged too ({problem}); resume from an earlier one or start again."
        msg = (f"non-finite {what} at iteration {it} (dataset indices {self._batch_indices}): {detail}. "
               f"Training stopped; {saved} Try a lower lr, a warmup, or check the data of these images.")
        self.log({"iter": it, "event": "non_finite", "what": what, "terms": terms or [],
                  "indices": self._batch_indices})
        self.flush_log()
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
        self._step_start = (self.epoch, self.batch_in_epoch, ckpt.capture_rng_state())
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for k in range(cfg.accum_steps):
            images, targets = self._next_batch()
            images, targets = to_device(images, targets, self.device)
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
        if cfg.clip_grad_norm:
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
        self.metrics, self.evaluated_at = metrics, self.iteration
        self.log({"iter": self.iteration, "event": "eval", "metrics": metrics})
        self.flush_log()
        if self.is_main:
            logger.info("iter %d  eval %s", self.iteration,
                        "  ".join(f"{k} AP {100 * v.get('AP', float('nan')):.1f}" for k, v in metrics.items()
                                  if isinstance(v, dict)))
        return metrics

    def _stop_requested(self) -> bool:
        """Whether to stop after this step (any rank's signal or stop() counts; all ranks agree)."""
        flags = torch.tensor([float(self.pending_signal is not None), float(self._stop_reason is not None)],
                             device=self.device)
        flags = dist_utils.all_reduce_sum(flags)
        if flags[0] > 0 and self.pending_signal is None:
            self.pending_signal = signal.SIGTERM
        if flags[1] > 0 and self._stop_reason is None:
            self._stop_reason = dist_utils.broadcast_object(self._stop_reason) or "callback"
        return bool(flags.sum() > 0)

    def train(self) -> TrainResult:
        """Run until max_iters, the time budget or a callback's stop(); returns a TrainResult. Rank 0 writes out_dir
        and holds its writer lock until the end."""
        cfg = self.cfg
        try:
            self._prepare_run_dir()
            check_dataset_files(self.train_dataset)
            self._t_start, self.eval_seconds = time.perf_counter(), 0.0
            self.saved_at = self.iteration if self.last_checkpoint is not None else -1
            self.evaluated_at = -1
            try:
                run_hooks.run_hooks(self.hooks, "on_train_start", self)
                while cfg.max_iters is None or self.iteration < cfg.max_iters:
                    t0 = time.perf_counter()
                    losses = self.train_step()
                    self.last_step_seconds = time.perf_counter() - t0
                    self.iteration += 1
                    self.last_losses = losses
                    run_hooks.run_hooks(self.hooks, "on_step_end", self, losses)
                    if self._stop_requested():
                        break
                self._step_start = None
                run_hooks.run_hooks(self.hooks, "on_train_end", self)
            except BaseException as exc:
                run_hooks.notify_exception(self.hooks, self, exc)
                raise
            result = TrainResult(iterations=self.iteration, elapsed_s=round(self.elapsed, 3),
                                 stop_reason=self._stop_reason or "max_iters", last_losses=self.last_losses,
                                 checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                                 model_path=str(self.model_path) if self.model_path else None, metrics=self.metrics,
                                 eval_s=round(self.eval_seconds, 3))
            if self.is_main:
                self.rundir.write_json(self.rundir.result_file, asdict(result))
            return result
        finally:
            self.rundir.unlock()
