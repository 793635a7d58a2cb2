"""The one file format of istr models and codecs: safetensors tensors + JSON metadata; save/load of any model.

A model file holds the state_dict and, in its metadata, what rebuilds the model:
    format "istr-model", version, istr_version,
    architecture   the registered architecture name (ARCHITECTURES: "istr", "isda", or one registered by a user)
    config         JSON of model.config(), the plain values its architecture's from_config(config) takes
    categories     JSON list of {"id", "name"} per label when the model carries them (model.categories)
A module that is not a registered architecture (a torchvision baseline trained with the same Trainer) is
saved as format "istr-state-dict" with its class name, and loads only into a given instance (model=...).

Run directories (istr.engine.Trainer) hold RUN/model.safetensors and RUN/checkpoints/iter_NNNNNNN/{model.safetensors,
trainer_state.pt}, with RUN/checkpoints/last naming the newest complete checkpoint; load_model takes any of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from istr.fileio import atomic_save, check_readable_file
from istr.registry import Registry

__all__ = ["ARCHITECTURES", "register_architecture", "read_safetensors", "write_safetensors", "save_model",
           "load_model", "find_model_file", "check_state_dict", "config_mismatches", "latest_checkpoint",
           "list_checkpoints", "MODEL_FILE", "STATE_FILE", "LAST_FILE"]

ARCHITECTURES = Registry("model architecture")

MODEL_FORMAT, STATE_DICT_FORMAT = "istr-model", "istr-state-dict"
MODEL_FORMAT_VERSION = "2"  # 2: architecture + categories keys; version 1 files are ISTR models
MODEL_FILE, STATE_FILE, LAST_FILE = "model.safetensors", "trainer_state.pt", "last"  # the run directory layout


def register_architecture(name: str) -> Callable:
    """Class decorator: a model class that save_model/load_model can rebuild. The class implements
    `config() -> dict` (plain JSON values) and `from_config(config) -> model` (a classmethod); it may list
    construction keys that need not match when loading into an existing model in `inference_options`."""

    def decorator(cls):
        for method in ("config", "from_config"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"architecture {name!r}: {cls.__name__} must define {method}()")
        cls.architecture = name
        return ARCHITECTURES.register(name)(cls)

    return decorator


# ---------------------------------------------------------------------------------------------------- files
def read_safetensors(path: str | Path, kind: str,
                     map_location: str | torch.device = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; `kind` ("codec", "model") names the file in the errors.

    FileNotFoundError when there is no file, PermissionError when it cannot be read, IsADirectoryError for a
    folder, ValueError naming the path when it is not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = check_readable_file(path, f"{kind} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a {kind} file (not a readable safetensors file: {exc})") from None
    return meta, tensors


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically with ordinary permissions (istr.fileio.atomic_save)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---------------------------------------------------------------------------------------------------- models
def save_model(model: nn.Module, path: str | Path) -> None:
    """Write `model` to one safetensors file: weights (codec included) and, for a registered architecture,
    everything load_model needs to rebuild it (config, categories). Other modules are saved as a plain
    state_dict that loads into an instance of the same class."""
    import istr

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_model expects an nn.Module, got {type(model).__name__}")
    tensors = model.state_dict()
    name = getattr(type(model), "architecture", None)
    if name is None or name not in ARCHITECTURES:
        meta = {"format": STATE_DICT_FORMAT, "class": type(model).__qualname__, "istr_version": istr.__version__}
    else:
        meta = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "istr_version": istr.__version__,
                "architecture": name, "config": json.dumps(model.config())}
        categories = getattr(model, "categories", None)
        if categories is not None:
            meta["categories"] = json.dumps(categories)
    write_safetensors(path, tensors, meta)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ckpt_root (RUN/checkpoints), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by ckpt_root/last (falls back to the newest complete one), or None."""
    root = Path(ckpt_root)
    pointer = root / LAST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def find_model_file(path: str | Path) -> Path:
    """A model file, a checkpoint directory or a run directory (its model.safetensors, else its newest
    checkpoint's) -> the model file. FileNotFoundError when there is none."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        last = latest_checkpoint(path / "checkpoints")
        if last is not None:
            return last / MODEL_FILE
        raise FileNotFoundError(f"no model in the directory {path}: expected a checkpoint directory or a training "
                                f"run directory (with {MODEL_FILE} or checkpoints/)")
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu", model: nn.Module | None = None) -> nn.Module:
    """Load a file written by save_model (or the model of a checkpoint or run directory, find_model_file): rebuilt
    from its stored architecture and config on `map_location`, in eval mode.

    model: load into this existing model instead (it keeps its device and train/eval mode); a ValueError names
    every construction arg and tensor that differs (the architecture's `inference_options`, such as min_size or
    detections_per_image, may differ).
    """
    path = find_model_file(path)
    meta, tensors = read_safetensors(path, "model", map_location)
    fmt = meta.get("format")
    if fmt == STATE_DICT_FORMAT:
        if model is None:
            raise ValueError(f"{path} holds the weights of a {meta.get('class')}, not of a registered istr "
                             f"architecture; load it into an instance: load_model(path, model=...)")
        if meta.get("class") != type(model).__qualname__:
            raise TypeError(f"{path} holds weights of a {meta.get('class')} but the model is a {type(model).__name__}")
        check_state_dict(model.state_dict(), tensors, path)
        model.load_state_dict(tensors)
        return model
    if fmt != MODEL_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is a safetensors file but not an istr model (metadata keys: {sorted(meta)}); "
                         "codec files load with istr.load_codec")
    config = json.loads(meta["config"])
    name = meta.get("architecture", "istr")  # version 1 files hold ISTR models
    categories = json.loads(meta["categories"]) if "categories" in meta else None
    fresh = model is None
    if model is None:
        model = ARCHITECTURES.get(name).from_config(config)
    else:
        if getattr(type(model), "architecture", None) != name:
            raise TypeError(f"{path} holds a {name!r} model but the model is a {type(model).__name__}")
        diffs = config_mismatches(config, model.config(), ignore=getattr(model, "inference_options", ()))
        if diffs:
            raise ValueError(f"{path} was saved from a different model: " + "; ".join(diffs))
    check_state_dict(model.state_dict(), tensors, path)
    model.load_state_dict(tensors)
    if categories is not None:
        model.categories = categories
    return model.to(map_location).eval() if fresh else model


def check_state_dict(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """ValueError naming the missing, unexpected and differently shaped tensors of a file against a model."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"shape mismatches {shapes[:10]}")


def config_mismatches(saved: dict[str, Any], current: dict[str, Any], prefix: str = "",
                      ignore: tuple[str, ...] | frozenset = ()) -> list[str]:
    """'key: file A vs model B' for every differing (nested) config value; top-level keys in `ignore` skipped."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_mismatches(a, b, f"{prefix}{key}.")
        elif json.loads(json.dumps(a)) != json.loads(json.dumps(b)):  # tuples vs lists compare equal
            diffs.append(f"{prefix}{key}: file {a!r} vs model {b!r}")
    return diffs
