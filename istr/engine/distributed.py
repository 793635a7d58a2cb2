"""torch.distributed helpers: env:// initialisation under torchrun, rank queries, reductions and barriers."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from istr.checks import check_device

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "is_dist", "get_rank", "get_world_size",
    "is_main_process", "barrier", "all_reduce_sum", "all_reduce_mean", "broadcast_object", "all_gather_object",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str | torch.device = "auto", backend: str | None = None,
                     timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain `python` run) this is a no-op returning rank 0 of 1. device "auto" picks
    cuda:LOCAL_RANK when CUDA is available, else cpu. backend defaults to nccl on CUDA and gloo on CPU.
    Already-initialised process groups (e.g. set up by the caller) are reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    dev = _resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        if backend is None:
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _resolve_device(device: str | torch.device, local_rank: int) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if isinstance(device, torch.device):
        return check_device(device, "device")
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else device
    return check_device(device, "device")  # a clear error for a device this machine lacks


def cleanup_distributed() -> None:
    """Destroy the default process group if one is active, after a barrier: every rank tears down together.

    Without the barrier a rank that finishes first destroys its gloo pairs while another rank still uses them
    (e.g. rank 0 saving files), which can abort a process at exit with "terminate called without an active exception".
    """
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (a copy; the input is left unchanged). Identity without a process group."""
    if not (is_dist() and get_world_size() > 1):
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a copy)."""
    return all_reduce_sum(tensor) / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank `src`'s value of a picklable object on every rank."""
    if not (is_dist() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's picklable object, indexed by rank."""
    if not (is_dist() and get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
