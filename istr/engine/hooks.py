"""The run's own hooks around the train loop: log writer, progress bar, signals, end of run, checkpoint on error.

Each is an istr.engine.callbacks.Callback that the Trainer installs before the config's (checkpoint, evaluation,
time budget) and the user's, in this order, so that on_train_end runs them first: LogWriter (per-iteration
records in log.jsonl), ProgressBar, SignalHandler (SIGINT/SIGTERM: finish the step, checkpoint, leave),
EndOfRun (final checkpoint, model file, final evaluation) and CheckpointOnError (an exception that ends training
keeps the last finished step).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from istr.engine.callbacks import Callback
from istr.errors import NonFiniteError

__all__ = ["LogWriter", "ProgressBar", "SignalHandler", "EndOfRun", "CheckpointOnError", "run_hooks",
           "notify_exception"]

logger = logging.getLogger("istr.engine.train")


class LogWriter(Callback):
    """One record per iteration (losses, lr, grad_norm, step time, training time, epoch) in log.jsonl, flushed
    every cfg.log_every iterations (and with each checkpoint and at the end), with an INFO log line."""

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.log({"iter": trainer.iteration, "lr": lr, **losses, "iter_time": round(trainer.last_step_seconds, 4),
                     "time": round(trainer.elapsed, 3), "epoch": trainer.epoch})
        every = trainer.cfg.log_every
        if every and trainer.iteration % every == 0:
            trainer.flush_log()
            logger.info("iter %d  loss %.4f  lr %.3g  %.2fs/it", trainer.iteration, losses["loss"], lr,
                        trainer.last_step_seconds)

    def on_train_end(self, trainer: Any) -> None:
        trainer.flush_log()

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        trainer.flush_log()


class ProgressBar(Callback):
    """A tqdm bar over cfg.max_iters on rank 0 (cfg.progress), with the loss and lr every cfg.log_every steps."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, trainer: Any) -> None:
        self.bar = None
        if trainer.cfg.progress and trainer.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.cfg.max_iters, initial=trainer.iteration, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer: Any, losses: dict[str, float]) -> None:
        if self.bar is None:
            return
        every = trainer.cfg.log_every
        if every and trainer.iteration % every == 0:
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{trainer.optimizer.param_groups[0]['lr']:.2g}")
        self.bar.update(1)

    def on_train_end(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self.on_train_end(trainer)


class SignalHandler(Callback):
    """SIGINT/SIGTERM set trainer.pending_signal (the loop finishes the step and stops on every rank); a second
    signal acts at once. At the end the last finished step is checkpointed, an "interrupted" event logged, and
    KeyboardInterrupt (SIGINT) or SystemExit(128 + signal) raised. Only the main thread can install handlers;
    elsewhere signals keep their default behaviour."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Any) -> None:
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            trainer.pending_signal = signum
            self._restore()  # a second signal is not deferred

        for s in self.previous:
            signal.signal(s, handler)

    def _restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        self._restore()

    def on_train_end(self, trainer: Any) -> None:
        self._restore()
        self.previous = {}
        signum = trainer.pending_signal
        if signum is None:
            return
        if trainer.saved_at != trainer.iteration:
            trainer.save_checkpoint()
        trainer.log({"iter": trainer.iteration, "event": "interrupted", "signal": int(signum)})
        trainer.flush_log()
        logger.warning("interrupted by signal %d: checkpoint of iteration %d in %s", signum, trainer.iteration,
                       trainer.last_checkpoint)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum))


class EndOfRun(Callback):
    """After the last step: a checkpoint (when checkpoints or a time budget are configured and the last step has
    none yet), the model file RUN/model.safetensors (rank 0), and the final evaluation (cfg.eval_at_end)."""

    def on_train_end(self, trainer: Any) -> None:
        cfg = trainer.cfg
        if trainer.saved_at != trainer.iteration and (cfg.checkpoint_every or cfg.max_minutes is not None):
            trainer.save_checkpoint()
        trainer.model_path = trainer.save_model()
        if cfg.eval_at_end and trainer.val_dataset is not None and trainer.evaluated_at != trainer.iteration:
            trainer.evaluate()


class CheckpointOnError(Callback):
    """An exception that ends training (a data error, a full disk, a bug in a callback, ...) first writes a
    checkpoint of the last finished step, as Ctrl-C does, and says so in one line naming the file and the
    iteration. Not for non-finite values (their last good checkpoint is kept unchanged), KeyboardInterrupt /
    SystemExit raised directly (a second Ctrl-C acts at once), or multi-process runs (the other ranks would
    wait for this one in the checkpoint's collectives)."""

    def on_exception(self, trainer: Any, exc: BaseException) -> None:
        if not isinstance(exc, Exception) or isinstance(exc, NonFiniteError) or trainer.dist.world_size > 1:
            return
        failed_at = trainer.iteration + 1
        if trainer.iteration == 0 or trainer.saved_at == trainer.iteration:
            if trainer.last_checkpoint is not None:
                logger.warning("training stopped at iteration %d by %s; the checkpoint of iteration %d is %s",
                               failed_at, type(exc).__name__, trainer.saved_at, trainer.last_checkpoint)
            return
        trainer.rewind_step()
        try:
            path = trainer.save_checkpoint()
        except Exception as save_exc:  # noqa: BLE001 - the original error is the one to raise
            logger.error("training stopped at iteration %d by %s, and the checkpoint of iteration %d could not be "
                         "written: %s", failed_at, type(exc).__name__, trainer.iteration, save_exc)
            return
        trainer.log({"iter": trainer.iteration, "event": "error", "error": type(exc).__name__,
                     "message": " ".join(str(exc).split())[:500], "checkpoint": str(path)})
        trainer.flush_log()
        logger.warning("training stopped at iteration %d by %s; checkpoint of iteration %d written to %s (resume "
                       "with --resume / resume=True)", failed_at, type(exc).__name__, trainer.iteration, path)


def run_hooks(hooks: list[Callback], method: str, trainer: Any, *args: Any) -> None:
    """Call `method` on every hook in order."""
    for hook in hooks:
        getattr(hook, method)(trainer, *args)


def notify_exception(hooks: list[Callback], trainer: Any, exc: BaseException) -> None:
    """on_exception on every hook; one hook failing there is logged and does not stop the others (the
    original exception is the one the caller re-raises)."""
    for hook in hooks:
        try:
            hook.on_exception(trainer, exc)
        except Exception as hook_exc:  # noqa: BLE001
            logger.error("%s.on_exception failed: %s", type(hook).__name__, hook_exc)
