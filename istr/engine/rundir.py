"""RunDir: the one owner of a run folder's layout (model, checkpoints, log, run record), its writer lock and reads.

Layout of a run folder (istr.engine.Trainer, `istr train`, `istr demo`; read by `istr eval` / `istr predict`):
    RUN/model.safetensors                  final weights (istr.save_model)                    RunDir.model_file
    RUN/checkpoints/iter_NNNNNNN/          model.safetensors + trainer_state.pt              RunDir.checkpoint_dir(i)
    RUN/checkpoints/last                   names the newest complete checkpoint              RunDir.latest_checkpoint()
    RUN/log.jsonl                          one JSON record per iteration and per event       RunDir.append_log()
    RUN/run.json                           the run record: resolved config, recipe, data     RunDir.update_record()
    RUN/train_config.json, train_result.json
    RUN/.lock                              held by the one process writing the run           RunDir.lock()
File names come from istr.io (MODEL_FILE, STATE_FILE, LAST_FILE), which load_model also reads.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from istr.fileio import atomic_write_bytes, read_json
from istr.engine.runlock import RunLock, RunLockedError
from istr.io import LAST_FILE, MODEL_FILE, STATE_FILE, list_checkpoints

__all__ = ["RunDir", "RunLock", "RunLockedError", "RUN_RECORD", "LOG_FILE", "CHECKPOINTS", "write_error"]

logger = logging.getLogger(__name__)

RUN_RECORD, LOG_FILE, CHECKPOINTS = "run.json", "log.jsonl", "checkpoints"
CONFIG_FILE, RESULT_FILE, LOCK_FILE = "train_config.json", "train_result.json", ".lock"
# what a training run writes (removed together by --overwrite / overwrite=True, so no stale file survives)
RUN_OUTPUTS = (LOG_FILE, MODEL_FILE, RESULT_FILE, CONFIG_FILE, CHECKPOINTS, RUN_RECORD)


def write_error(path: str | Path, needed_bytes: int | None, exc: BaseException) -> OSError | None:
    """For an exception raised while writing `path` (after the caller removed the partial file): one OSError line
    naming the path and, for a full disk, the space needed and free; None when `exc` is no write failure (a
    KeyboardInterrupt, a bug), which the caller re-raises as it is. Covers OSError, safetensors' SafetensorError
    and torch.save's RuntimeError ("file write failed")."""
    if not isinstance(exc, Exception):
        return None
    text = str(exc)
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("No space left", "StorageFull", "Disk quota", "os error 28", "file write failed"))
    if not (isinstance(exc, OSError) or full or type(exc).__name__ == "SafetensorError"):
        return None
    path = Path(path)
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free if probe.exists() else None
    if full or (needed_bytes and free is not None and free < needed_bytes):
        need = f"about {_mb(needed_bytes)} needed" if needed_bytes else "more space needed"
        have = f", {_mb(free)} free on {probe}" if free is not None else ""
        return _os_error(errno.ENOSPC, f"no space left to write {path} ({need}{have}); the partial file was "
                         "removed: free some space (or choose another folder) and try again")
    return _os_error(code or errno.EIO, f"cannot write {path}: {' '.join(text.split())}; the partial file was removed")


def _os_error(code: int, message: str) -> OSError:
    """An OSError whose str() is `message` (not "[Errno N] ...") and whose errno is `code`."""
    exc = OSError(message)
    exc.errno = code
    return exc


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 20:.1f} MB"


class RunDir:
    """A run folder: its paths, its run record (run.json), log (log.jsonl), checkpoints and writer lock.

    RunDir(root) touches nothing on disk; the methods that write say so. Every read names the file it failed on.
    """

    def __init__(self, root: str | Path) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"a run directory must be a path, got {type(root).__name__}")
        self.root = Path(root)
        self._lock = RunLock(self.root / LOCK_FILE)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------------ paths
    @property
    def model_file(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE

    @property
    def record_file(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def result_file(self) -> Path:
        return self.root / RESULT_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.checkpoints / f"iter_{int(iteration):07d}"

    @staticmethod
    def checkpoint_iteration(path: str | Path | None) -> int | None:
        """The iteration of a checkpoint directory named iter_NNNNNNN, else None."""
        try:
            return int(Path(path).name.split("_")[-1])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    @staticmethod
    def is_checkpoint(path: str | Path) -> bool:
        path = Path(path)
        return path.is_dir() and (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file()

    # ------------------------------------------------------------------------------------------------ checkpoints
    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint checkpoints/last names (the newest complete one when `last` is missing, unreadable or
        names none; an unreadable `last` is reported with its path), or None."""
        pointer = self.checkpoints / LAST_FILE
        if pointer.is_file():
            try:
                name = pointer.read_bytes().decode("utf-8").strip()
                candidate = self.checkpoints / name
                if name and "/" not in name and (candidate / STATE_FILE).is_file():
                    return candidate
            except (OSError, UnicodeDecodeError) as exc:
                logger.warning("%s is unreadable (%s); using the newest complete checkpoint instead", pointer, exc)
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def find_checkpoint(self, spec: str | Path | None) -> Path | None:
        """--resume's argument -> a checkpoint directory. None/"auto": this run's newest checkpoint (None when there
        is none); a checkpoint directory; or another run directory (its newest checkpoint). FileNotFoundError
        otherwise."""
        if spec is None or spec == "auto":
            return self.latest_checkpoint()
        path = Path(spec)
        if path.is_dir() and not (path / STATE_FILE).exists() and (path / CHECKPOINTS).is_dir():
            path = RunDir(path).latest_checkpoint() or path
        if not self.is_checkpoint(path):
            raise FileNotFoundError(f"--resume {spec}: expected a checkpoint directory (holding {MODEL_FILE} and "
                                    f"{STATE_FILE}, e.g. OUT/checkpoints/iter_0005000) or a training run directory")
        return path

    @staticmethod
    def checkpoint_problem(path: str | Path) -> str | None:
        """Why the checkpoint at `path` cannot be resumed from (missing files, a model file whose checksums fail, a
        truncated trainer state), or None when it reads back whole. Reads every byte of it."""
        from istr.io import load_torch_file, read_safetensors

        path = Path(path)
        try:
            read_safetensors(path / MODEL_FILE, "model")
            load_torch_file(path / STATE_FILE, "trainer state")
        except (OSError, ValueError) as exc:
            return " ".join(str(exc).split())
        return None

    def find_model(self) -> Path:
        """The run's model file: RUN/model.safetensors, else its newest checkpoint's. FileNotFoundError if none."""
        if self.model_file.is_file():
            return self.model_file
        last = self.latest_checkpoint()
        if last is not None:
            return last / MODEL_FILE
        raise FileNotFoundError(f"no model in the directory {self.root}: expected a checkpoint directory or a "
                                f"training run directory (with {MODEL_FILE} or {CHECKPOINTS}/)")

    # ------------------------------------------------------------------------------------------------ state of the folder
    def previous_run(self) -> list[str]:
        """Names of a previous run's outputs present in the folder (an empty checkpoints/ does not count)."""
        present = [name for name in RUN_OUTPUTS if (self.root / name).exists() or (self.root / name).is_symlink()]
        if CHECKPOINTS in present and not self.list_checkpoints():
            present.remove(CHECKPOINTS)
        return present

    def clear(self, names: Iterable[str] = RUN_OUTPUTS) -> list[str]:
        """Delete a previous run's outputs (`names`, default every file a training run writes). Returns what went."""
        removed = []
        for name in names:
            target = self.root / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            else:
                continue
            removed.append(name)
        return removed

    def prepare(self, resumed: bool = False, overwrite: bool = False) -> None:
        """Before a run writes here: take the writer lock; refuse a previous run's outputs unless the run resumes it
        or overwrite=True (which deletes all of them, so nothing stale survives); create the folders and prove they
        are writable."""
        self.lock()
        previous = self.previous_run()
        if previous and not resumed and not overwrite:
            raise FileExistsError(f"{self.root} holds a previous run ({', '.join(previous)}): resume it "
                                  "(resume=True, istr train --resume) or start over in it (overwrite=True, "
                                  "istr train --overwrite), or choose another output directory")
        if overwrite and not resumed:
            self.clear()
        self.check_writable()

    def check_writable(self) -> None:
        """Create the folder and checkpoints/ and prove a file can be written in each; PermissionError naming the
        folder otherwise."""
        for folder in (self.root, self.checkpoints):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write_test_{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise PermissionError(f"cannot write training output to {folder}: {exc}") from None

    # ------------------------------------------------------------------------------------------------ lock
    def lock(self) -> RunLock:
        """Take the folder's writer lock (RunLockedError when a live process holds it) until unlock(), the process's
        end, or this RunDir's garbage collection (keep a reference while writing). Idempotent for this object."""
        return self._lock.acquire()

    def unlock(self) -> None:
        """Release the writer lock if this RunDir holds it."""
        self._lock.release()

    @property
    def locked(self) -> bool:
        """Whether this RunDir holds the writer lock."""
        return self._lock.held

    def check_not_locked(self) -> None:
        """RunLockedError when a live process (not this RunDir) writes the folder; nothing is taken or changed."""
        if not self._lock.held:
            self._lock.check_free()

    # ------------------------------------------------------------------------------------------------ run record
    def read_record(self) -> dict[str, Any]:
        """run.json's content ({} when absent); ValueError naming the file when it is not a JSON object."""
        if not self.record_file.is_file():
            return {}
        record = read_json(self.record_file, "run record")
        if not isinstance(record, dict):
            raise ValueError(f"run record {self.record_file} must hold a JSON object, got {type(record).__name__}")
        return record

    def update_record(self, fresh: bool = False, **values: Any) -> dict[str, Any]:
        """Merge `values` into run.json (fresh=True: replace it) atomically; the only writer of run.json."""
        record = {} if fresh else self.read_record()
        record.update(values)
        atomic_write_bytes(self.record_file, json.dumps(record, indent=2, default=repr).encode())
        return record

    def val_data(self) -> tuple[str, str] | None:
        """(val images, val json) recorded by the run (istr eval RUN needs no data flags), or None."""
        record = self.read_record()
        images, ann = record.get("val_images"), record.get("val_ann")
        return (str(images), str(ann)) if images and ann else None

    def write_json(self, path: Path, value: Any) -> None:
        atomic_write_bytes(path, json.dumps(value, indent=2, default=str).encode())

    # ------------------------------------------------------------------------------------------------ log
    def append_log(self, lines: Sequence[str]) -> None:
        """Append JSON lines to log.jsonl."""
        if not lines:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """log.jsonl's records; a torn, non-JSON or non-UTF-8 line is dropped with a warning naming the file and
        line number."""
        return [record for _, record in self._log_lines()]

    def _log_lines(self) -> list[tuple[bytes, dict[str, Any]]]:
        if not self.log_file.is_file():
            return []
        out = []
        for number, raw in enumerate(self.log_file.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as exc:
                logger.warning("%s line %d: dropped an unreadable record (torn by an interruption or damaged: %s): "
                               "%.80r", self.log_file, number, exc, raw)
                continue
            out.append((raw, record))
        return out

    def truncate_log(self, iteration: int) -> None:
        """Keep only the records up to `iteration` (a resumed run redoes the rest), dropping unreadable lines."""
        if not self.log_file.is_file():
            return
        kept = [raw for raw, record in self._log_lines() if record.get("iter", 0) <= iteration]
        atomic_write_bytes(self.log_file, b"".join(raw + b"\n" for raw in kept))
