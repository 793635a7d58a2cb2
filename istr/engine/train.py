"""train(): the one-call training entry point; re-exports TrainConfig, Trainer and friends from their modules.

The parts: istr.engine.config (TrainConfig, recipe resolution, lr schedule), istr.engine.train_loop (Trainer: the
step, optimizer, finite checks, resume), istr.engine.hooks and istr.engine.callbacks (log, progress, signals,
checkpoints, evaluation, time budget, end of run), istr.engine.rundir (the run folder and its lock).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from istr.engine.callbacks import Callback
from istr.engine.config import FIXED_ON_RESUME, TrainConfig, warmup_multistep_factor
from istr.engine.train_loop import NonFiniteLossError, Trainer, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "NonFiniteLossError", "train", "warmup_multistep_factor",
           "FIXED_ON_RESUME"]


def train(model: nn.Module, train_dataset: Sequence[Any], cfg: TrainConfig | None = None,
          val_dataset: Sequence[Any] | None = None, out_dir: str | Path = "runs/train",
          resume: bool | str | Path = False, collate_fn: Callable | None = None,
          callbacks: Sequence[Callback] = (), overwrite: bool = False) -> TrainResult:
    """Train `model` on `train_dataset` ((image [3,H,W] float in [0,1], target dict) pairs) following `cfg`.

    resume: False (start fresh), True (continue from out_dir's newest checkpoint if there is one), or a
    checkpoint directory. overwrite: start fresh in an out_dir that holds a previous run (deleting it).
    Returns a TrainResult; see Trainer and istr.engine.rundir for the files written to out_dir.
    """
    trainer = Trainer(model, train_dataset, cfg, val_dataset=val_dataset, out_dir=out_dir, collate_fn=collate_fn,
                      callbacks=callbacks, overwrite=overwrite)
    if resume is True:
        trainer.resume(None)
    elif resume:
        trainer.resume(resume)
    return trainer.train()
