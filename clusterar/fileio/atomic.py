"""Atomic file writes: nothing is ever written in place, so a crash or Ctrl-C leaves either the old file or
the new one, never half of one.

A process killed while it writes leaves its temporary file (`.NAME.tmp-HOST-PID`, hidden, never a final
name) behind; the next write into that folder by any process on the same host removes the temporary
files of processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ClusterarError
from ..killpoints import kill_point

_HOST = socket.gethostname().replace("/", "_")
_swept: set[Path] = set()  # folders whose stale temporary files this process has removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files that killed processes of this host left in `folder`; return them.

    Only files named like `atomic_path`'s (`.NAME.tmp-HOST-PID`) whose PID no longer runs are removed: a
    write in progress (this process or another one) is never touched, nor another host's file on a
    shared file system.
    """
    removed = []
    marker = f".tmp-{_HOST}-"
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        head, sep, pid = entry.name.rpartition(marker)
        if not (sep and entry.name.startswith(".") and head and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode the user's umask gives new files (0644 usually), whichever library wrote them
# (safetensors writes 0600), so that a teammate can read a shared run.
FILE_MODE = 0o666 & ~_umask()
# The errors that mean "this output cannot be written here" (the user's to fix), not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failed write (disk full, permissions) removes the temporary file and says which file it was. The
    first write of a process into a folder also removes what killed writers left there (see the module
    docstring), so an interrupted run does not accumulate temporary files over its reruns.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = path.parent.absolute()
        if folder not in _swept:
            remove_stale_temps(folder)
            _swept.add(folder)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise ClusterarError(
            f"cannot write {path} ({e.strerror}); free some space or choose another output folder"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike, flag: str = "--out", kind: str = "file or folder") -> None:
    """Fail before any work if `path` (a file or folder to create) cannot be written.

    `kind` ("file", "folder", or "file or folder") is what the command writes at `path`: an existing one
    of the other kind is refused, not found out by a traceback at the end of the work. Then finds the
    nearest folder that exists above `path` and creates (and removes) a probe file in it: that answers
    for permissions, read-only file systems and a file standing where a folder must go, also for root,
    whom `os.access` would not refuse.
    """
    path = Path(path)
    try:
        probe_dir = _check_kind(path, flag, kind)
    except OSError as e:  # a name longer than the file system allows, a symlink loop: not a traceback
        raise ClusterarError(f"{flag} {path}: {e.strerror}; choose another {flag}") from None
    try:
        fd, name = tempfile.mkstemp(prefix=".clusterar-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ClusterarError(
            f"{flag} {path}: cannot write in {probe_dir} ({e.strerror}); choose another {flag} or make the "
            "folder writable"
        ) from None


def _check_kind(path: Path, flag: str, kind: str) -> Path:
    """Refuse an existing `path` of the other kind than `kind`; return the folder to probe."""
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ClusterarError(
            f"{flag} {path} is a file; this command writes a folder there: pass a folder path"
        )
    if kind == "file" and path.is_dir():
        raise ClusterarError(f"{flag} {path} is a folder; this command writes a file there: pass a file path")
    probe_dir = path if path.is_dir() else path.parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ClusterarError(
            f"{flag} {path}: {probe_dir} is a file, not a folder; choose another {flag} or move the file"
        )
    return probe_dir


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
