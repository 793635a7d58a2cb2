"""File helpers: atomic writes with ordinary permissions, and a readable-file check with honest errors.

Why: safetensors >= 0.8 writes through a temporary file created with mode 0600 and renames it into place
(safetensors/safetensors#782), so a saved codec or model cannot be read by other users; and safetensors reports an
unreadable file as "No such file or directory". `atomic_save` gives saved files the mode an ordinary `open(path,
"w")` would (0o666 & ~umask) and never leaves a half-written file at `path`; `check_readable_file` tells a
missing file (FileNotFoundError) from an unreadable one (PermissionError) and from a directory (IsADirectoryError).
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_save", "atomic_write_bytes", "check_readable_file", "default_file_mode"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:  # Linux >= 4.7 shows the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 & ~umask (0o644 under the usual umask 022)."""
    return 0o666 & ~_umask()


def atomic_save(path: str | Path, write_fn: Callable[[str], object], mode: int | None = None) -> Path:
    """Write `path` through `write_fn(temp_path: str)` (which writes the whole file there), then give the file
    `mode` (default: default_file_mode()) and os.replace() it into place. Returns `path` as a Path.

    The temporary file lies in the same folder (same filesystem: the rename is atomic), so readers see either the
    old file or the complete new one; it is removed when write_fn fails. Parent folders are created.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the file {path}: it is an existing directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically with ordinary permissions (see atomic_save)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return atomic_save(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def check_readable_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if it is a file this process can read; otherwise raise, naming `what` and the path:
    FileNotFoundError (nothing there), IsADirectoryError (a directory), PermissionError (exists, not readable:
    says who owns it and its mode).
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path} (no such file)") from None
    except PermissionError:
        raise PermissionError(f"cannot read the {what} {path}: permission denied on a folder above it") from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(f"{what} {path} is a directory; expected a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"the {what} {path} exists but is not readable by this user (mode "
                              f"{stat.filemode(info.st_mode)}, owner uid {info.st_uid}); ask its owner to run "
                              f"`chmod a+r {path}`")
    return path


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file. A missing, directory or unreadable path raises as check_readable_file;
    invalid JSON or text that is not UTF-8 raises ValueError naming `what`, the path, and the line and column."""
    path = check_readable_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text: {e}") from None
