"""RunLock: one writer per run folder (an flock'ed RUN/.lock naming its holder's PID and host; stale locks reported)."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "RunLockedError", "read_lock"]

logger = logging.getLogger("istr.engine.rundir")


class RunLockedError(RuntimeError):
    """Another live process writes this run folder (its PID and host are in the message)."""


@dataclass(frozen=True)
class _Holder:
    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"PID {self.pid} on host {self.host}, started {self.started}"


class RunLock:
    """An exclusive lock on a run folder: RUN/.lock holds {"pid", "host", "started"} of the writer, and an
    fcntl.flock on it lives exactly as long as the process (a crashed run leaves the file but not the flock:
    the next writer detects the stale lock and reports whose it was). release() (or leaving `with`) frees it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be removed between open and flock by a releasing holder: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunLockedError(_locked_message(self.path)) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:  # pragma: no cover - only under a storm of concurrent writers
            raise RunLockedError(f"could not lock {self.path}: other processes keep taking it")
        stale = _parse_holder(os.read(fd, 4096))
        if stale is not None and (stale.pid, stale.host) != (os.getpid(), socket.gethostname()):
            logger.warning("%s: took over a stale lock of a run that is no longer alive (%s)", self.path, stale)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # unlink first: a waiting writer that opened the old file rechecks the inode
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def check_free(self) -> None:
        """RunLockedError when a live process holds the lock; takes nothing (a shared flock probe)."""
        import fcntl

        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: free
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise RunLockedError(_locked_message(self.path)) from None
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - a forgotten lock dies with its object
        with contextlib.suppress(Exception):
            self.release()


def _parse_holder(raw: bytes) -> _Holder | None:
    try:
        d = json.loads(raw.decode("utf-8"))
        return _Holder(int(d["pid"]), str(d["host"]), str(d.get("started", "?")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def read_lock(path: Path) -> _Holder | None:
    """Who holds (or held) the lock file at `path`, or None when it is absent or unreadable."""
    try:
        return _parse_holder(Path(path).read_bytes())
    except OSError:
        return None


def _locked_message(path: Path) -> str:
    holder = read_lock(path)
    return (f"{path.parent} is being written by a live run ({holder or 'holder unknown'}; lock file {path}): wait "
            "for it to finish or stop it, or choose another output directory")
