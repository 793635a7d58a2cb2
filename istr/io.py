"""The one file format of istr models and codecs: safetensors tensors + JSON metadata; save/load of any model.

Over 400 lines as one job: writing, verifying (checksums, versions, metadata keys) and reading the files belong
together, so that what a file promises and what a reader checks are read side by side.

A model file holds the state_dict and, in its metadata, what rebuilds the model:
    format "istr-model", version, istr_version,
    architecture   the registered architecture name (ARCHITECTURES: "istr", "isda", or one registered by a user)
    config         JSON of model.config(), the plain values its architecture's from_config(config) takes
    categories     JSON list of {"id", "name"} per label when the model carries them (model.categories)
A module that is not a registered architecture (a torchvision baseline trained with the same Trainer) is
saved as format "istr-state-dict" with its class name, and loads only into a given instance (model=...).

Integrity: every file written here (models, codecs, checkpoints' model files) stores, under the metadata key
"checksums", the CRC-32 of each tensor's bytes and of the other metadata; loading verifies them and raises
CorruptFileError (a ValueError) naming the file and the tensor or key that changed. Files written before checksums
existed (model format version <= 2, codec format 1) have none and load unverified. A file whose format version is
newer than this library's is refused; missing or extra metadata keys, an unknown architecture, a config that does
not build the model and a category list that does not match num_classes each raise one ValueError naming the file
and the key. load_torch_file reads torch.save files (trainer_state.pt) with the same care: the zip's CRC-32 of
every record is checked, and truncated or damaged files raise CorruptFileError naming the file.

Run directories (istr.engine.Trainer) hold RUN/model.safetensors and RUN/checkpoints/iter_NNNNNNN/{model.safetensors,
trainer_state.pt}, with RUN/checkpoints/last naming the newest complete checkpoint; load_model takes any of them.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from istr.checks import check_device
from istr.fileio import atomic_save, check_readable_file
from istr.registry import Registry

__all__ = ["ARCHITECTURES", "register_architecture", "read_safetensors", "write_safetensors", "save_model",
           "load_model", "find_model_file", "check_state_dict", "config_mismatches", "latest_checkpoint",
           "list_checkpoints", "MODEL_FILE", "STATE_FILE", "LAST_FILE", "CorruptFileError", "load_torch_file",
           "check_format_version", "metadata_json", "CHECKSUMS_KEY", "save_torch_file", "verify_checkpoint",
           "check_torch_file"]

# a model class that save_model/load_model can rebuild: it implements `config() -> dict` (plain JSON values) and
# `from_config(config) -> model` (a classmethod), and may list construction keys that need not match when loading
# into an existing model in `inference_options` (istr.models.DetectionModel provides all of it)
ARCHITECTURES = Registry("model architecture", name_attr="architecture", required=("config", "from_config"))

MODEL_FORMAT, STATE_DICT_FORMAT = "istr-model", "istr-state-dict"
# 2: architecture + categories keys; version 1 files are ISTR models. 3: checksums (required from 3 on)
MODEL_FORMAT_VERSION = "3"
CHECKSUMS_KEY = "checksums"
_MODEL_KEYS = {"format", "version", "istr_version", "architecture", "config", "categories", CHECKSUMS_KEY}
_STATE_DICT_KEYS = {"format", "version", "class", "istr_version", CHECKSUMS_KEY}
MODEL_FILE, STATE_FILE, LAST_FILE = "model.safetensors", "trainer_state.pt", "last"  # the run directory layout


class CorruptFileError(ValueError):
    """A file's bytes do not match the checksums stored when it was written, or it is truncated/undecodable:
    it was damaged or modified after it was written."""


register_architecture = ARCHITECTURES.register  # class decorator (see ARCHITECTURES)


# ---------------------------------------------------------------------------------------------------- files
def _crc(data: bytes | memoryview) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _tensor_crc(tensor: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's bytes as safetensors stores them (C order, native = little-endian byte order)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return _crc(b"")
    return _crc(memoryview(flat.view(torch.uint8).numpy()))


def _metadata_crc(metadata: dict[str, str]) -> str:
    body = {k: v for k, v in metadata.items() if k != CHECKSUMS_KEY}
    return _crc(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def metadata_json(path: str | Path, meta: dict[str, str], key: str, kind: str = "file") -> Any:
    """json.loads(meta[key]) of a safetensors file's metadata; a missing key or text that is not JSON raises one
    ValueError naming the file and the key."""
    if key not in meta:
        raise ValueError(f"{kind} file {path}: metadata key {key!r} is missing (keys: {sorted(meta)})")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{kind} file {path}: metadata key {key!r} is not valid JSON ({exc})") from None


def check_format_version(path: str | Path, meta: dict[str, str], current: str, kind: str) -> int:
    """The file's format version as an int (metadata key "version"); ValueError naming the file when it is missing
    or not a number, or newer than `current` (written by a newer istr: upgrade to read it)."""
    text = meta.get("version")
    if text is None:
        raise ValueError(f"{kind} file {path}: metadata key 'version' is missing (keys: {sorted(meta)})")
    try:
        version = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{kind} file {path}: metadata key 'version' is {text!r}, not a format version") from None
    if version > int(current):
        import istr

        raise ValueError(f"{kind} file {path} has format version {version}, newer than this istr "
                         f"({istr.__version__}) reads (up to {current}; written by istr "
                         f"{meta.get('istr_version', '?')}): upgrade istr to load it")
    if version < 1:
        raise ValueError(f"{kind} file {path}: metadata key 'version' is {text!r}, not a format version")
    return version


def _verify_checksums(path: Path, kind: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """CorruptFileError naming the file and the first tensor / the metadata whose CRC-32 differs from the stored one."""
    stored = metadata_json(path, meta, CHECKSUMS_KEY, kind)
    if (not isinstance(stored, dict) or stored.get("algorithm") != "crc32"
            or not isinstance(stored.get("tensors"), dict) or not isinstance(stored.get("metadata"), str)):
        raise CorruptFileError(f"{kind} file {path}: metadata key {CHECKSUMS_KEY!r} is damaged (expected "
                               "{'algorithm': 'crc32', 'metadata': ..., 'tensors': {...}})")
    if stored["metadata"] != _metadata_crc(meta):
        raise CorruptFileError(f"{kind} file {path} is corrupt: its metadata (config, categories, ...) does not "
                               f"match the checksum stored when it was written; it was modified or damaged since")
    names = stored["tensors"]
    if set(names) != set(tensors):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise CorruptFileError(f"{kind} file {path} is corrupt: its tensors differ from those written (missing "
                               f"{missing[:5]}, not written {extra[:5]})")
    for name, tensor in tensors.items():
        if _tensor_crc(tensor) != names[name]:
            raise CorruptFileError(f"{kind} file {path} is corrupt: the bytes of tensor {name!r} do not match the "
                                   f"checksum stored when it was written (crc32 {names[name]} stored, "
                                   f"{_tensor_crc(tensor)} read); the file was modified or damaged since")


def read_safetensors(path: str | Path, kind: str, map_location: str | torch.device = "cpu",
                     require_checksums: bool = False) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; `kind` ("codec", "model") names the file in the errors.

    Tensors are verified against the stored checksums (metadata "checksums", write_safetensors) when the file has
    them, before they move to `map_location`; require_checksums: a file without them is refused.
    FileNotFoundError when there is no file, PermissionError when it cannot be read, IsADirectoryError for a
    folder, CorruptFileError (a ValueError) when a checksum differs, ValueError naming the path when it is not a
    readable safetensors file or map_location names a device this machine lacks.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    device = check_device(map_location, "map_location")
    path = check_readable_file(path, f"{kind} file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a {kind} file (not a readable safetensors file: {exc})") from None
    if CHECKSUMS_KEY in meta:
        _verify_checksums(path, kind, meta, tensors)
    elif require_checksums:
        raise ValueError(f"{kind} file {path}: metadata key {CHECKSUMS_KEY!r} is missing (keys: {sorted(meta)}); "
                         "files of this format version are written with checksums")
    if device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return meta, tensors


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      what: str = "safetensors file") -> None:
    """Write a safetensors file atomically with ordinary permissions (istr.fileio.atomic_save), with the CRC-32 of
    every tensor and of the metadata stored under metadata["checksums"] (read_safetensors verifies them).
    A device without room for it raises istr.fileio.DiskFullError naming `what`, the path and the space needed,
    before writing when the free space is known to be short, and leaves no partial file in any case."""
    from safetensors.torch import save_file

    if CHECKSUMS_KEY in metadata:
        raise ValueError(f"metadata key {CHECKSUMS_KEY!r} is reserved for the checksums write_safetensors adds")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    checksums = {"algorithm": "crc32", "metadata": _metadata_crc(metadata),
                 "tensors": {k: _tensor_crc(v) for k, v in tensors.items()}}
    metadata = {**metadata, CHECKSUMS_KEY: json.dumps(checksums, sort_keys=True)}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    size += len(json.dumps(metadata)) + 120 * len(tensors) + 8  # the JSON header: metadata, names, shapes, offsets
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), size=size, what=what)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside nested dicts/lists/tuples (what torch.save will write, give or take its headers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_torch_file(obj: Any, path: str | Path, what: str = "file") -> Path:
    """torch.save(obj) to `path` atomically (istr.fileio.atomic_save): readers see the old file or the complete new
    one, never a torn one; a device without room raises DiskFullError naming `what`, the path and the space needed
    (before writing when the free space is known to be short) and leaves no partial file. load_torch_file reads it
    back verified."""
    size = _tensor_bytes(obj) + 64 * 1024  # pickled structure and zip records
    return atomic_save(path, lambda tmp: torch.save(obj, tmp), size=size, what=what)


def check_torch_file(path: str | Path, kind: str = "file") -> Path:
    """`path` as a Path after reading every record of a torch.save file and checking it against the CRC-32 its zip
    container stored when it was written (torch.load checks none). FileNotFoundError / PermissionError /
    IsADirectoryError as check_readable_file; CorruptFileError (a ValueError) naming `kind` and the path for a
    truncated or damaged file."""
    path = check_readable_file(path, kind)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CorruptFileError(f"{kind} {path} is truncated or not a torch.save file ({exc}); it was not written "
                               "completely or was damaged since") from None
    except OSError as exc:
        raise CorruptFileError(f"{kind} {path} cannot be read: {exc}") from None
    if bad is not None:
        raise CorruptFileError(f"{kind} {path} is corrupt: its record {bad!r} does not match the checksum stored "
                               "when it was written; the file was modified or damaged since")
    return path


def load_torch_file(path: str | Path, kind: str = "file", map_location: str | torch.device = "cpu") -> Any:
    """torch.load(path, weights_only=True) of a torch.save file (e.g. a checkpoint's trainer_state.pt), with errors
    that name the file: FileNotFoundError / PermissionError / IsADirectoryError as check_readable_file; a truncated
    file, one whose bytes no longer match the CRC-32 torch's zip container stores for each record, or one torch
    cannot read raises CorruptFileError (a ValueError) naming `kind` and the path."""
    device = check_device(map_location, "map_location")
    path = check_torch_file(path, kind)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, pickle errors, EOFError, ... for bad files
        raise CorruptFileError(f"{kind} {path} cannot be loaded ({type(exc).__name__}: {exc})") from None


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
        meta = {"format": STATE_DICT_FORMAT, "version": MODEL_FORMAT_VERSION, "class": type(model).__qualname__,
                "istr_version": istr.__version__}
    else:
        meta = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "istr_version": istr.__version__,
                "architecture": name, "config": json.dumps(model.config())}
        categories = getattr(model, "categories", None)
        if categories is not None:
            meta["categories"] = json.dumps(categories)
    write_safetensors(path, tensors, meta, what="model file")


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ckpt_root (RUN/checkpoints), oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by ckpt_root/last (falls back to the newest complete one, with a warning naming the
    file when `last` cannot be read or is not UTF-8), or None."""
    root = Path(ckpt_root)
    pointer = root / LAST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            import warnings

            warnings.warn(f"{pointer} is unreadable ({exc}); using the newest complete checkpoint instead",
                          stacklevel=2)
            name = ""
        candidate = root / name
        if name and "/" not in name and (candidate / STATE_FILE).is_file():
            return candidate
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def verify_checkpoint(path: str | Path) -> None:
    """Check a checkpoint directory's files against the checksums stored when they were written, without loading
    them into a model: its model file's tensors and metadata (read_safetensors) and every record of its training
    state (the torch.save zip's CRC-32s). CorruptFileError (a ValueError) naming the damaged file,
    FileNotFoundError when a file is missing. Reads both files once (about a second per GB)."""
    path = Path(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {name} is missing")
    read_safetensors(path / MODEL_FILE, "model")
    check_torch_file(path / STATE_FILE, "training state")


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
        version = check_format_version(path, meta, MODEL_FORMAT_VERSION, "model") if "version" in meta else 2
        _check_metadata_keys(path, meta, _STATE_DICT_KEYS, ("class",), version)
        if model is None:
            raise ValueError(f"{path} holds the weights of a {meta.get('class')}, not of a registered istr "
                             f"architecture; load it into an instance: load_model(path, model=...)")
        if meta.get("class") != type(model).__qualname__:
            raise TypeError(f"{path} holds weights of a {meta.get('class')} but the model is a {type(model).__name__}")
        check_state_dict(model.state_dict(), tensors, path)
        model.load_state_dict(tensors)
        return model
    if fmt != MODEL_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an istr model (metadata keys: {sorted(meta)}); "
                         "codec files load with istr.load_codec")
    version = check_format_version(path, meta, MODEL_FORMAT_VERSION, "model")
    _check_metadata_keys(path, meta, _MODEL_KEYS, ("config",) + (("architecture",) if version >= 2 else ()), version)
    config = metadata_json(path, meta, "config", "model")
    if not isinstance(config, dict):
        raise ValueError(f"model file {path}: metadata key 'config' must be a JSON object, got "
                         f"{type(config).__name__}")
    name = meta.get("architecture", "istr")  # version 1 files hold ISTR models
    if name not in ARCHITECTURES:
        raise ValueError(f"model file {path}: metadata key 'architecture' is {name!r}, which is not a registered "
                         f"architecture (known: {', '.join(ARCHITECTURES.list()) or 'none'}); a model registered by "
                         "user code loads after that code is imported")
    categories = _file_categories(path, meta, config)
    upgrade = getattr(ARCHITECTURES.get(name), "upgrade_config", None)
    config = upgrade(config) if callable(upgrade) else config  # a file of an older version in today's terms
    fresh = model is None
    if model is None:
        try:
            model = ARCHITECTURES.get(name).from_config(config)
        except (KeyError, TypeError, ValueError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise ValueError(f"model file {path}: metadata key 'config' does not build a {name!r} model "
                             f"({type(exc).__name__}: {text})") from None
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


def _check_metadata_keys(path: Path, meta: dict[str, str], allowed: set[str], required: tuple[str, ...],
                         version: int) -> None:
    """check_metadata_keys for model files (checksums required from format version 3 on)."""
    required = required + ((CHECKSUMS_KEY,) if version >= 3 else ())
    check_metadata_keys(path, meta, allowed, required, "model", meta.get("format"))


def check_metadata_keys(path: Path, meta: dict[str, str], allowed: set[str], required: tuple[str, ...], kind: str,
                        format_name: str | None = None) -> None:
    """One ValueError naming the `kind` file ("model", "codec") and the missing required keys, or the keys its
    format (`format_name`, default the kind) does not have."""
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f"{kind} file {path}: metadata key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))} missing (keys: {sorted(meta)})")
    extra = sorted(set(meta) - allowed)
    if extra:
        raise ValueError(f"{kind} file {path}: unknown metadata key{'s' if len(extra) > 1 else ''} "
                         f"{', '.join(map(repr, extra))} (a {format_name or kind} file has {sorted(allowed)})")


def _file_categories(path: Path, meta: dict[str, str], config: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The file's category list ([{"id", "name"}] per label), checked against its config's num_classes."""
    if "categories" not in meta:
        return None
    categories = metadata_json(path, meta, "categories", "model")
    if categories is None:
        return None
    if not isinstance(categories, list) or not all(
            isinstance(c, dict) and "id" in c and "name" in c for c in categories):
        raise ValueError(f"model file {path}: metadata key 'categories' must be a list of {{'id', 'name'}} objects, "
                         f"got {str(categories)[:100]}")
    num_classes = config.get("num_classes")
    if isinstance(num_classes, int) and len(categories) != num_classes:
        raise ValueError(f"model file {path}: metadata key 'categories' lists {len(categories)} categories but the "
                         f"model has num_classes={num_classes}")
    return categories


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
