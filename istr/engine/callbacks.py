"""Trainer callbacks: the time budget, periodic evaluation and checkpoints, and a step timer, as public hooks.

A callback overrides any of on_train_start(trainer), on_step_end(trainer, losses), on_train_end(trainer) and
on_exception(trainer, exc) (an exception is ending the run; it is re-raised after every callback saw it).
It may read the trainer's public state (iteration, epoch, cfg, module, out_dir, elapsed, last_step_seconds,
is_main) and call trainer.stop(reason), trainer.evaluate(), trainer.save_checkpoint() and trainer.log(record).
TrainConfig's max_minutes, checkpoint_every and eval_every install the built-in ones below; the run's own
machinery (log writer, progress bar, signals, end of run, checkpoint on error) is in istr.engine.hooks.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any

from istr.checks import check_number

__all__ = ["Callback", "TimeBudget", "PeriodicCheckpoint", "PeriodicEvaluation", "StepTimer", "ScheduleToBudget"]

logger = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        pass

    def on_train_end(self, trainer: Any) -> None:
        pass

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        pass


class TimeBudget(Callback):
    """Stop when the next step would end past `minutes` of training time (time of resumed runs included)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = 60.0 * check_number("minutes", minutes, min=0, min_inclusive=False)

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        if trainer.elapsed + 0.5 * trainer.last_step_seconds >= self.seconds:
            trainer.stop("time_budget")


class PeriodicCheckpoint(Callback):
    """trainer.save_checkpoint() every `every` iterations."""

    def __init__(self, every: int) -> None:
        self.every = check_number("every", every, integer=True, min=0)

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        if self.every and trainer.iteration % self.every == 0:
            trainer.save_checkpoint()


class PeriodicEvaluation(Callback):
    """trainer.evaluate() every `every` iterations (a no-op without a validation set)."""

    def __init__(self, every: int) -> None:
        self.every = check_number("every", every, integer=True, min=0)

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        if self.every and trainer.iteration % self.every == 0:
            trainer.evaluate()


class StepTimer(Callback):
    """After `skip` + `calibrate` steps, print the seconds per step (median of the `calibrate` steps after the
    first `skip`, which are slower: memory allocation, kernel selection) and the expected time to cfg.max_iters;
    later, warn (once per `warn_every` steps at most) when a step takes over `slow_factor` x the median of the
    steps so far, which on a CPU usually means other processes are competing for it. Both windows shrink to fit
    a run shorter than `skip` + `calibrate` steps (cfg.max_iters), so the estimate is always printed."""

    def __init__(self, calibrate: int = 10, slow_factor: float = 3.0, warn_every: int = 50, echo=print,
                 skip: int = 5) -> None:
        self.calibrate = check_number("calibrate", calibrate, integer=True, min=1)
        self.slow_factor = check_number("slow_factor", slow_factor, min=1)
        self.warn_every = check_number("warn_every", warn_every, integer=True, min=0)
        self.skip = check_number("skip", skip, integer=True, min=0)
        if not callable(echo):
            raise TypeError(f"echo must be callable (e.g. print), got {type(echo).__name__}")
        self.echo = echo
        self._skip, self._calibrate = self.skip, self.calibrate  # this run's windows (on_train_start fits them)
        self.times: list[float] = []
        self.last_warning = -10**9

    def on_train_start(self, trainer: Any) -> None:
        """Fit the windows to this run, from the requested ones (a timer reused for another run starts afresh)."""
        self.times, self.last_warning = [], -10**9
        self._skip, self._calibrate = self.skip, self.calibrate
        total = trainer.cfg.max_iters
        if total is not None:
            self._skip = min(self.skip, max(0, total - self.calibrate))
            self._calibrate = max(1, min(self.calibrate, total - self._skip))

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        self.times.append(trainer.last_step_seconds)
        if not trainer.is_main or len(self.times) <= self._skip:
            return
        n, median = len(self.times) - self._skip, statistics.median(self.times[self._skip:])
        if n == self._calibrate:
            total = trainer.cfg.max_iters
            left = "" if total is None else (f"; {total - trainer.iteration} steps to go, expected "
                                              f"{(total - trainer.iteration) * median / 60:.1f} min more")
            first = self._skip + 1
            self.echo(f"{median:.2f} s per training step (median of steps {first}-{first + n - 1}){left}")
            trainer.log({"iter": trainer.iteration, "event": "speed", "seconds_per_iter": round(median, 4)})
        elif (n > self._calibrate and self.times[-1] > self.slow_factor * median
              and trainer.iteration - self.last_warning >= self.warn_every):
            self.last_warning = trainer.iteration
            self.echo(f"warning: step {trainer.iteration} took {self.times[-1]:.2f} s, {self.times[-1] / median:.1f}x "
                      f"the median {median:.2f} s: is another process using the CPU?")
            trainer.log({"iter": trainer.iteration, "event": "slow_step", "seconds": round(self.times[-1], 4),
                         "median": round(median, 4)})


class ScheduleToBudget(Callback):
    """Fit a step lr schedule into cfg.max_minutes: from step `calibrate` + 1 on, and every `every` steps until
    the decay has happened, estimate from the mean speed so far how many steps the budget allows and put the lr
    decay (cfg.milestones, read lazily by the schedule) at `decay_at` of them. For time-budget comparisons (e.g.
    benchmarks/train_budget.py); a step budget (cfg.max_iters with fixed milestones) is reproducible where this is
    not."""

    def __init__(self, decay_at: float = 0.8, calibrate: int = 20, every: int = 10) -> None:
        self.decay_at = check_number("decay_at", decay_at, min=0, max=1, min_inclusive=False, max_inclusive=False)
        self.calibrate = check_number("calibrate", calibrate, integer=True, min=1)
        self.every = check_number("every", every, integer=True, min=1)
        self.start: float | None = None

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        it, cfg = trainer.iteration, trainer.cfg
        if self.start is None:
            self.start, self.start_iter = trainer.elapsed, it
        if cfg.max_minutes is None or it <= self.calibrate or (it - self.calibrate - 1) % self.every:
            return
        if cfg.milestones and it >= cfg.milestones[0]:
            return  # the decay has happened: keep it
        per_iter = (trainer.elapsed - self.start) / max(it - self.start_iter, 1)
        total = it + max(0, int((cfg.max_minutes * 60 - trainer.elapsed) / max(per_iter, 1e-9)))
        if cfg.max_iters is not None:
            total = min(total, cfg.max_iters)
        cfg.milestones = (max(it + 1, int(self.decay_at * total)),)
        trainer.log({"iter": it, "event": "schedule", "seconds_per_iter": round(per_iter, 4),
                     "expected_iters": total, "milestones": list(cfg.milestones)})
