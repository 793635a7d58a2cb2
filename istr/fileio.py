"""File helpers: atomic writes with ordinary permissions, and a readable-file check with honest errors.

Why: safetensors >= 0.8 writes through a temporary file created with mode 0600 and renames it into place
(safetensors/safetensors#782), so a saved codec or model cannot be read by other users; and safetensors reports an
unreadable file as "No such file or directory". `atomic_save` gives saved files the mode an ordinary `open(path,
"w")` would (0o666 & ~umask) and never leaves a half-written file at `path` (nor a temporary file beside it, on any
failure); a full disk is one DiskFullError (an OSError, errno ENOSPC) naming the path, the space needed and the space
free, raised before writing when the size is known to exceed the free space. `check_readable_file` tells a missing file
(FileNotFoundError) from an unreadable one (PermissionError) and from a directory (IsADirectoryError); `read_json`
names the file in every decode error.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_save", "atomic_write_bytes", "check_readable_file", "default_file_mode", "read_json", "DiskFullError",
           "check_free_space", "is_disk_full_error", "human_bytes"]


class DiskFullError(OSError):
    """Not enough space on the device to write a file (errno ENOSPC); the message names the path, the space needed
    (when known) and the space free."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as df -H)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(path: str | Path, needed: int, what: str = "file") -> None:
    """DiskFullError before anything is written when the filesystem that will hold `path` has fewer than `needed`
    bytes free (nothing when the free space cannot be read). Its folder (or the nearest existing folder above) is
    the one measured."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = _free_bytes(folder)
    if free is not None and needed > free:
        raise DiskFullError(errno.ENOSPC, f"not enough space to write the {what} {path}: it needs about "
                                          f"{human_bytes(needed)}, {human_bytes(free)} are free on the device of "
                                          f"{folder}; free some space or write elsewhere")


def is_disk_full_error(exc: BaseException) -> bool:
    """Whether `exc` says the device is full: an OSError with errno ENOSPC / EDQUOT, or a wrapped one (safetensors'
    SafetensorError "No space left on device (os error 28)", torch's stream errors with that text)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text

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


def atomic_save(path: str | Path, write_fn: Callable[[str], object], mode: int | None = None,
                size: int | None = None, what: str = "file") -> Path:
    """Write `path` through `write_fn(temp_path: str)` (which writes the whole file there), then give the file
    `mode` (default: default_file_mode()) and os.replace() it into place. Returns `path` as a Path.

    The temporary file lies in the same folder (same filesystem: the rename is atomic), so readers see either the
    old file or the complete new one; it is removed whenever writing fails. Parent folders are created.
    size: the file's expected size in bytes, when known: a device with less free space is refused before writing
    (DiskFullError). Whatever write_fn raises on a full device (OSError ENOSPC, SafetensorError, torch's stream
    errors) becomes one DiskFullError naming `what`, the path, the size needed and the space free.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the {what} {path}: it is an existing directory")
    if size is not None:
        check_free_space(path, size, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        if is_disk_full_error(exc):
            raise _disk_full(path, what, size) from None
        raise
    try:
        write_fn(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        free = _free_bytes(path.parent)
        if is_disk_full_error(exc) or (isinstance(exc, Exception) and free is not None and (
                free == 0 or (size is not None and free < size))):
            raise _disk_full(path, what, size) from exc
        raise
    return path


def _disk_full(path: Path, what: str, size: int | None) -> DiskFullError:
    free = _free_bytes(path.parent)
    need = f"it needs about {human_bytes(size)}" if size is not None else "it did not fit"
    have = f"{human_bytes(free)} are free" if free is not None else "the free space is unknown"
    return DiskFullError(errno.ENOSPC, f"no space left on the device to write the {what} {path}: {need}, {have} on "
                                       f"the device of {path.parent} (the partial file was removed); free some space "
                                       "or write elsewhere")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically with ordinary permissions (see atomic_save)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return atomic_save(path, lambda tmp: Path(tmp).write_bytes(data), mode, size=len(data))


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
