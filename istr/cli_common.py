"""What the `istr` commands share: argument parsing and checks (numbers via istr.checks, output paths, device), the
TrainConfig options generated from its fields, datasets from data flags, one-line errors, metrics in percent."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import torch

from istr.checks import check_device, check_number, parse_bool
from istr.data import CocoInstances, build_transforms
from istr.engine.config import TrainConfig
from istr.engine.rundir import RunDir
from istr.fileio import check_readable_file
from istr.models import preset_info

__all__ = ["parse_key_values", "resolve_model_path", "error_text", "is_non_empty_dir", "check_writable_parent",
           "check_out_dir", "check_out_file", "build", "check_registered", "check_model_name", "coco_dataset",
           "data_paths", "pct", "print_metrics", "number_arg", "check_numbers", "config_fields", "add_config_args",
           "config_from_args", "check_device_flag"]


def parse_key_values(items: Sequence[str] | None, what: str = "argument") -> dict[str, Any]:
    """["k=v", ...] -> {k: v}; values are parsed as JSON when they can be (numbers, true/false, lists), else str;
    the Python spellings True/False are booleans too (istr.checks.parse_bool)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like KEY=VALUE, got {item!r}")
        if value in ("True", "False"):
            out[key] = parse_bool(value)
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_model_path(path: str | Path) -> Path:
    """A model file, a checkpoint dir (holding model.safetensors) or a training run dir -> the model file.

    FileNotFoundError when there is none, PermissionError when it exists but cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).find_model()
    return check_readable_file(path, "model file")


def error_text(exc: BaseException) -> str:
    """One line for an exception: KeyError without its repr quotes; an error raised in a DataLoader worker as its
    original message (not the worker's folded traceback); newlines folded."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if "Original Traceback" in text:  # torch re-raises worker errors as "Caught X in DataLoader worker ..."
        prefix = f"{type(exc).__name__}: "
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        if lines:
            text = lines[-1][len(prefix):]
    text = " ".join(text.split())
    return text or type(exc).__name__


def is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above `path` must be a folder we may write in (path itself is created later)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, so no folder can be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write in {parent} (permission denied)")


def check_out_dir(path: str | Path, flag: str, overwrite: bool, resume_hint: bool = False) -> Path:
    """An output directory: not an existing file, not written by a live run; an existing non-empty one only with
    --overwrite (or --resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is an existing file; expected a directory (new, empty, or "
                              "with --overwrite one whose files may be replaced)")
    RunDir(path).check_not_locked()
    if is_non_empty_dir(path) and not overwrite:
        also = "continue its training with --resume, or " if resume_hint else ""
        raise FileExistsError(f"{flag} {path} is an existing non-empty directory; {also}pass --overwrite to replace "
                              "its files, or choose a new directory")
    check_writable_parent(path / "x", flag)
    return path


def check_out_file(path: str | Path | None, flag: str, overwrite: bool) -> Path | None:
    """An output file: not a directory; an existing file only with --overwrite; its folder writable."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is an existing directory; expected a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it, or choose a new file")
    check_writable_parent(path, flag)
    return path


def build(what: str, flag: str, factory, *args: Any, **kwargs: Any):
    """factory(*args, **kwargs) with user-given keywords: a TypeError (an unknown keyword, a value of the wrong
    type) becomes a ValueError naming `flag`."""
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{flag} does not fit {what}: {error_text(exc)}") from exc


def check_registered(registry, name: str, flag: str) -> None:
    try:
        registry.get(name)
    except KeyError as exc:
        raise ValueError(f"{flag}: {error_text(exc)}") from None


def check_model_name(name: str, flag: str = "--model") -> None:
    try:
        preset_info(name)
    except KeyError as exc:
        raise ValueError(f"{flag}: {error_text(exc)}") from None


def coco_dataset(images: str, ann: str, train: bool = False, augment: str = "none", aug_scale: float = 1.0,
             segmentations: bool = False) -> CocoInstances:
    transforms = None
    if train and augment != "none":
        transforms = build_transforms(True, scale=aug_scale, crop_prob=0.5 if augment == "paper" else 0.0)
    return CocoInstances(images, ann, transforms=transforms, include_empty=not train, segmentations=segmentations)


def data_paths(args: argparse.Namespace, split: str) -> tuple[str, str] | None:
    """(image dir, annotation file) for split "train"/"val" from --synthetic ROOT or --{split}-images/--{split}-ann."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    if getattr(args, "synthetic", None):
        root = Path(args.synthetic)
        images = images or str(root / split)
        ann = ann or str(root / "annotations" / f"instances_{split}.json")
    if (images is None) != (ann is None):
        raise ValueError(f"give both --{split}-images and --{split}-ann (or --synthetic ROOT)")
    return (images, ann) if images else None


def pct(value: float) -> str:
    """A COCO metric (a fraction; -1 where COCOeval has no ground truth) as a percentage with one decimal."""
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def print_metrics(metrics: dict[str, Any]) -> None:
    """COCO metrics in % with one decimal ("mask: AP 37.1  AP50 ..."); with "stages", one line per stage first."""
    stages = metrics.get("stages") or []
    for i, stage in enumerate(stages, 1):
        parts = [f"{'mask' if kind == 'segm' else 'box'} " + "  ".join(
            f"{k} {pct(stage[kind][k])}" for k in ("AP", "AP50", "AP75") if k in stage[kind])
            for kind in ("segm", "bbox") if isinstance(stage.get(kind), dict)]  # fmt: skip
        print(f"stage {i}/{len(stages)}: " + "  |  ".join(parts))
    for kind in ("segm", "bbox"):
        if isinstance(metrics.get(kind), dict):
            row = "  ".join(f"{k} {pct(v)}" for k, v in metrics[kind].items() if isinstance(v, float))
            print(f"{'mask' if kind == 'segm' else 'box '}: {row}  (%)")


# ---------------------------------------------------------------------------------------------------- numbers
def number_arg(p: argparse.ArgumentParser, flag: str, *, integer: bool = False, default: Any = None,
                help: str | None = None, **bounds: Any) -> None:
    """An int/float option whose value is checked after parsing by istr.checks.check_number (finite, in range);
    the bounds are kept with the parser's defaults, so main() checks every command's numbers the same way."""
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, type=int if integer else float, default=default, help=help)
    checks = dict(p.get_default("_number_checks") or {})
    checks[dest] = (flag, dict(integer=integer, allow_none=default is None, **bounds))
    p.set_defaults(_number_checks=checks)


def check_numbers(args: argparse.Namespace) -> None:
    for dest, (flag, kwargs) in (getattr(args, "_number_checks", None) or {}).items():
        setattr(args, dest, check_number(flag, getattr(args, dest), **kwargs))


# ---------------------------------------------------------------------------------------------------- TrainConfig flags
def config_fields() -> list[tuple[dataclasses.Field, str, Any]]:
    """(field, flag, type hint) of every TrainConfig field the command line offers (metadata cli != False)."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True) is False:
            continue
        out.append((f, f.metadata.get("flag", "--" + f.name.replace("_", "-")), hints[f.name]))
    return out


def plain_type(hint: Any) -> Any:
    """int / float / str / bool / tuple[...] of an annotation, without its `| None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union)) and args:
        return plain_type(args[0])
    return hint


def add_config_args(group: argparse._ArgumentGroup) -> None:
    """One option per TrainConfig field, from its name (or metadata "flag"), type, default and metadata "help"."""
    for f, flag, hint in config_fields():
        kind = plain_type(hint)
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or "default" in f.metadata["help"] else f" (default {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=None, help=f.metadata["help"] + shown)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple:
            item, *rest = typing.get_args(kind)
            nargs = "*" if rest == [Ellipsis] else len(typing.get_args(kind))
            group.add_argument(flag, type=item, nargs=nargs, metavar=item.__name__.upper(), **kwargs)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **kwargs)
        else:  # pragma: no cover - a new field of another type must say cli=False or get a parser here
            raise TypeError(f"TrainConfig.{f.name}: no command-line form for {hint}; set metadata cli=False")


def config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The TrainConfig of the given options (others keep TrainConfig's defaults); errors name the flag. A time
    budget (--minutes) without --max-iters removes the step limit."""
    values = {f.name: getattr(args, f.name) for f, _, _ in config_fields() if getattr(args, f.name) is not None}
    if values.get("max_minutes") is not None and "max_iters" not in values:
        values["max_iters"] = None
    try:
        return TrainConfig(**values, **extra)
    except (TypeError, ValueError) as exc:
        flags = {f.name: flag for f, flag, _ in config_fields()}
        name, _, rest = str(exc).partition(" ")
        if name in flags:
            raise ValueError(f"{flags[name]} {rest}") from None
        raise ValueError(str(exc)) from None


def check_device_flag(device: str | None) -> None:
    """--device must name a torch device this machine has ("auto" lets the trainer choose)."""
    if device is None or device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {exc}") from None
    check_device(device, "--device")
