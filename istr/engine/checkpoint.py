"""Training-state checkpoints: the model (istr.save_model) plus optimizer, scheduler, RNG and data-order state.

Layout of one checkpoint (a directory, written to a temporary name and renamed when complete):
    <out_dir>/checkpoints/iter_0000500/model.safetensors   istr.save_model: weights, codec, construction args
                                                           (modules of no registered architecture: state_dict)
    <out_dir>/checkpoints/iter_0000500/trainer_state.pt    optimizer, scheduler, RNG states, iteration, data order
    <out_dir>/checkpoints/last                             text file naming the newest complete checkpoint
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from istr.io import (LAST_FILE, MODEL_FILE, STATE_FILE, latest_checkpoint, list_checkpoints, load_model, load_torch_file,
                     save_model, save_torch_file)

__all__ = [
    "CheckpointMismatchError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
    "prune_checkpoints", "capture_rng_state", "restore_rng_state", "checkpoint_bytes",
]

_FORMAT = "istr-train-state"
_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a model whose construction args or parameters differ from the given one."""


# ---------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and python `random` states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


# ---------------------------------------------------------------------------------------------------- save / find
def save_checkpoint(ckpt_root: str | Path, model: nn.Module, trainer_state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint `iter_<iteration>` under ckpt_root atomically, point `last` at it, prune to `keep` newest.

    trainer_state must contain "iteration" (int); everything else (optimizer/scheduler state dicts, RNG states,
    data order, config) is stored as given with torch.save. Returns the checkpoint directory.
    """
    if "iteration" not in trainer_state:
        raise ValueError("trainer_state must contain 'iteration'")
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{int(trainer_state['iteration']):07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, tmp / MODEL_FILE)
        save_torch_file({"format": _FORMAT, "version": _VERSION, **trainer_state}, tmp / STATE_FILE, "training state")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        last_tmp = root / f".{LAST_FILE}.tmp"
        try:
            last_tmp.write_text(name + "\n")
            os.replace(last_tmp, root / LAST_FILE)
        finally:
            last_tmp.unlink(missing_ok=True)
    except BaseException as exc:  # a full disk, a quota, Ctrl-C: no partial checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        from istr.engine.rundir import write_error

        failure = write_error(final, checkpoint_bytes(model, trainer_state), exc)
        if failure is None:
            raise
        raise failure from exc
    if keep:
        prune_checkpoints(root, keep)
    return final


def checkpoint_bytes(model: nn.Module, trainer_state: dict[str, Any]) -> int:
    """About how many bytes a checkpoint of `model` and `trainer_state` takes (its tensors' sizes)."""
    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(size(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return 0

    return size(model.state_dict()) + size(trainer_state)


def prune_checkpoints(ckpt_root: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints; never the one `last` names."""
    last = latest_checkpoint(ckpt_root)
    ckpts = list_checkpoints(ckpt_root)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if last is None or old.resolve() != last.resolve():
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- load
def load_checkpoint(path: str | Path, model: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the model weights (and codec) of checkpoint `path` into `model` and return its trainer state dict.

    Raises CheckpointMismatchError naming the differing construction args / parameters when the checkpoint was
    written by a different model, FileNotFoundError when `path` is not a checkpoint directory.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (expected {MODEL_FILE} and {STATE_FILE} in it)")
    state = load_torch_file(path / STATE_FILE, "trainer state", map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path / STATE_FILE} is not an istr training state (format "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    try:
        load_model(path / MODEL_FILE, map_location=map_location, model=model)
    except (ValueError, TypeError) as exc:
        raise CheckpointMismatchError(f"cannot resume from {path}: {exc}") from None
    return state
