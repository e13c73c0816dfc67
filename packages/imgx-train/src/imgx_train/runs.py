"""Run directories: creation, locking, `runs/latest`, metrics JSONL files, description."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgx_train import config as config_lib
from imgx_train import distributed


class RunError(FileNotFoundError):
    """A run directory that is missing, incomplete or cannot be written (e.g. a full disk)."""


# tensorstore (orbax's array writer) reports a full disk as a ValueError without an errno,
# e.g. `UNKNOWN: Error writing local file "...": [OS error 28: No space left on device]`.
_DISK_FULL_MARKERS = ("no space left on device", "enospc", "os error 28", "errno 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` or an exception it was raised from is an `ENOSPC` OSError, or says
    so in its message (tensorstore's errors carry no errno)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if any(marker in str(current).lower() for marker in _DISK_FULL_MARKERS):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(path: str | Path, run_dir: str | Path | None = None) -> RunError:
    """The error raised when writing `path` found the disk full (`ENOSPC`)."""
    resume = (
        f"; the last complete checkpoint is kept: free some space, then resume with: "
        f"imgx train --resume {run_dir}"
        if run_dir is not None
        else "; free some space and try again"
    )
    return RunError(f"cannot write {path}: the disk is full (no space left on device){resume}")


RUNS_ROOT = Path("runs")


def new_run_dir(cfg: config_lib.Config, root: str | Path = RUNS_ROOT) -> Path:
    """Creates and returns `runs/<YYYYmmdd-HHMMSS>-<data>-<task>[-fold<k>][-<n>]`.

    The folder is made here, without `exist_ok`: two processes that start in the same
    second race for the name in `mkdir`, which only one wins; the other takes the next
    suffix. So no two runs ever share a folder.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    base = f"{stamp}-{cfg.data.name}-{cfg.train.task}"
    if cfg.data.fold is not None:
        base += f"-fold{cfg.data.fold}"
    i = 0
    try:
        root.mkdir(parents=True, exist_ok=True)
        while True:
            path = root / (base if i == 0 else f"{base}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                i += 1
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise RunError(f"cannot create a run directory in {root}: {reason}") from e


LOCK_NAME = ".lock"


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[Path]:
    """Holds `<run>/.lock` while the body writes into the run; yields the lock file.

    The lock is an exclusive `fcntl.flock` on the file, which holds the holder's pid and
    host. The kernel drops it when the holder exits, however it exits (also `kill -9`),
    so a lock file left by a dead process does not block: only the flock state counts,
    never the file's existence. The file itself stays (unlinking it would let a process
    that opened the old file and one that creates a new one both hold "the" lock).

    Raises:
      RunError: another process holds the lock; the message names its pid and host.
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"cannot create the lock file {path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"run {run_dir} is in use by {_lock_holder(fd)} (lock {path}); "
                "wait for it or stop it"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(fd: int) -> str:
    """`pid 1234 on host h` from a held lock file (what its holder wrote)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(holder['pid'])} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


def check_writable(run_dir: Path) -> None:
    """Fails clearly when `run_dir` could not be created or written; creates nothing.

    Checked before the data, so that a bad location is reported at once, and the run
    directory itself is only made once the data is known to be there.
    """
    ancestor = Path(os.path.abspath(run_dir))
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunError(f"cannot write the run directory {run_dir}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunError(f"cannot write the run directory {run_dir}: permission denied on {ancestor}")


def prepare(run_dir: Path) -> None:
    """Creates the run layout, failing clearly when the location cannot be written."""
    try:
        for sub in ("metrics", "plots"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        # host and pid: processes of one run on several hosts share the folder
        probe = run_dir / f".write_test-{distributed.process_tag()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise RunError(f"cannot write the run directory {run_dir}: {reason}") from e


def point_latest(run_dir: Path) -> None:
    """Makes `<parent>/latest` a relative symlink to `run_dir` (best effort)."""
    latest = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        tmp.replace(latest)
    except OSError:
        pass


def check_run_dir(run_dir: str | Path) -> Path:
    """The resolved run dir, or a RunError saying what is missing."""
    path = Path(run_dir)
    if not path.exists():
        raise RunError(f"run directory {path} does not exist")
    if not (path / "config.json").exists():
        raise RunError(f"{path} is not an imgx run: config.json is missing")
    return path.resolve()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends one JSON object per line; each line is flushed so a crash keeps the rest."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _json_value(v) for k, v in record.items()})
        try:
            with self.path.open("a") as f:
                f.write(line + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.path, self.path.parent.parent) from e
            raise

    def truncate_after(self, step: int) -> None:
        """Drops records past `step` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return records
