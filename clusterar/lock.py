"""One writer per folder: an advisory lock held for the whole life of a job that writes a folder.

Without it, two `clusterar train --out R` started together both run and both say "model written": one
run's work is lost, or R is torn (config and log of one run, checkpoint and model of the other). So
every long job that writes a folder (transformer and tokenizer training, encoding, a sample folder, an
experiment) runs inside `folder_lock(folder)`, and a second process that asks for the same folder is
refused at once with `FolderInUse`: one line naming the process that holds it.

How, and why this way:

- `fcntl.flock(LOCK_EX | LOCK_NB)` on FOLDER/.lock (`LOCK_FILE`), which records the holder's pid, host
  and start time for the refusal. The kernel drops a flock lock when the process that holds it ends,
  however it ends (exit, exception, Ctrl-C, SIGKILL, the OOM killer), so nothing needs recovering after
  a crash: a .lock left by a dead process is simply locked again, and a refused lock is always held by a
  live process (it is never "stale"). Linux NFS clients (2.6.12+) pass flock locks to the server, so
  jobs on two machines of a cluster see each other's locks too.
- The lock file is removed on release, so a finished folder holds only its outputs. Removing a lock
  file is racy in general: a process that opened it just before the holder removed it would then lock
  the removed file while a third process creates and locks a new one, and both would write. So the
  holder removes the file while it still holds the lock (and only if the name is still its file), and a
  process that got the lock checks that FOLDER/.lock still is the file it locked (same device and inode)
  and starts over otherwise. A process killed before releasing leaves its .lock behind (a hidden file);
  the next job in the folder takes it over and removes it.
- Re-entrant per process and folder: an experiment holds its folder while its stages lock their own
  subfolders, and a job that locks a folder its caller already holds goes on (a second flock of the
  same process on a new open file would refuse the process itself). Threads of one process count as
  one writer.
- Under torchrun only rank 0 locks (`active=False` on the other ranks, which work for it).
- A folder the lock had to create and that is still empty on release is removed again, so that a job
  refused by a check before it wrote anything leaves no folder behind.
- A file system that cannot lock (Lustre mounted without flock, NFS without its lock daemon) gets a
  warning and an unlocked job rather than a refusal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ClusterarError

try:
    import fcntl
except ImportError:  # Windows is not a target: jobs run unlocked there, with the warning below
    fcntl = None

__all__ = ["LOCK_FILE", "FolderInUse", "folder_lock", "read_holder"]

LOCK_FILE = ".lock"
_ATTEMPTS = 50  # lock files replaced under us before we give up (each needs another process's release)


class FolderInUse(ClusterarError):
    """Another process holds the folder's lock: the one-line refusal, with that process's pid and host
    when its lock file says them (None otherwise)."""

    def __init__(self, folder: Path, holder: dict | None):
        self.folder = folder
        self.pid = holder.get("pid") if holder else None
        self.host = holder.get("host") if holder else None
        who = ""
        if holder:
            since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.get("since", 0)))
            who = f" (pid {self.pid} on {self.host}, since {since})"
        super().__init__(
            f"{folder} is in use by another clusterar process{who}; wait for it to finish or choose "
            "another --out"
        )


@dataclass
class _Held:
    """A folder this process holds (as the first `folder_lock` spelled it): the open lock file (None: the
    file system cannot lock), how many blocks hold it, the folders the first one created (removed if
    still empty)."""

    folder: Path
    fd: int | None
    count: int = 1
    created: list[Path] = field(default_factory=list)


_held: dict[tuple[int, int], _Held] = {}  # by the folder's (device, inode): any spelling of its path
_guard = threading.Lock()
_warned: set[Path] = set()  # folders that could not be locked, said once


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, active: bool = True) -> Iterator[Path]:
    """Hold `folder` (created if missing) for the block, or refuse with `FolderInUse` if another process
    holds it. Re-entrant in one process; `active=False` (torchrun ranks other than 0) does nothing."""
    folder = Path(folder)
    if not active:
        yield folder
        return
    with _guard:
        created = _make_folder(folder)
        key = _folder_key(folder)
        held = _held.get(key)
        if held is not None:
            held.count += 1
        else:
            try:
                fd, more = _acquire(folder)
            except BaseException:
                _remove_empty(created)  # refused: leave no folder behind either
                raise
            held = _held[key] = _Held(folder, fd, created=created + more)
    try:
        yield folder
    finally:
        with _guard:
            held.count -= 1
            if held.count == 0:
                del _held[key]
                _release(held)


def read_holder(folder: str | os.PathLike) -> dict | None:
    """What FOLDER/.lock says of its holder ({"pid", "host", "since"}), None if there is none (it does
    not say whether the holder still runs: only a failed `folder_lock` says that)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- taking and giving back


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, deepest first."""
    missing, p = [], folder.absolute()
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        what = f"{folder}" if p == folder.absolute() else f"{folder}: {p}"
        raise ClusterarError(
            f"{what} is a file, not a folder; choose another --out or move the file"
        ) from None
    except OSError as e:
        raise ClusterarError(
            f"cannot create {folder} ({e.strerror}); choose another --out or make its parent writable"
        ) from None
    return missing


def _folder_key(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def _acquire(folder: Path) -> tuple[int | None, list[Path]]:
    """Lock FOLDER/.lock (see the module docstring): the open file and the folders created meanwhile
    (when a releasing process removed the folder between our mkdir and our open)."""
    path, created = folder / LOCK_FILE, []
    if fcntl is None:
        _say_unlocked(folder, "this platform has no fcntl")
        return None, created
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:  # an empty folder was removed on release: make it again
            created += _make_folder(folder)
            continue
        except OSError as e:
            raise _cannot_open(folder, path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise FolderInUse(folder, holder) from None
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP...: a file system without locks
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            _say_unlocked(folder, e.strerror)
            return None, created
        if _is_file_at(fd, path):
            _write_holder(fd)
            return fd, created
        os.close(fd)  # the file we locked was removed (and maybe replaced) by its releasing holder
    raise ClusterarError(f"cannot lock {folder}: its {LOCK_FILE} kept being replaced; run the command again")


def _release(held: _Held) -> None:
    """Remove the lock file (while still holding it, and only if the name is still ours), then drop the
    lock; then remove the folders the lock created if they are still empty."""
    if held.fd is not None:
        path = held.folder / LOCK_FILE
        with contextlib.suppress(OSError):
            if _is_file_at(held.fd, path):
                os.unlink(path)
        os.close(held.fd)
    _remove_empty(held.created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders a lock created, deepest first, as long as they are empty."""
    for p in sorted(set(created), key=lambda q: len(q.parts), reverse=True):
        try:
            os.rmdir(p)
        except OSError:  # not empty (the job wrote there, or another process is in it): keep it
            break


def _is_file_at(fd: int, path: Path) -> bool:
    """True if `path` names the open file `fd` (not removed, nor replaced by another file)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _say_unlocked(folder: Path, why: str) -> None:
    """No lock to be had here: say so (once per folder); the job runs unlocked."""
    if folder in _warned:
        return
    _warned.add(folder)
    from .runtime import notice

    notice(
        f"cannot lock {folder} ({why}); going on without a lock: make sure no other clusterar process "
        "writes there"
    )


def _cannot_open(folder: Path, path: Path, e: OSError) -> ClusterarError:
    if e.errno in (errno.ELOOP, errno.EISDIR):
        return ClusterarError(
            f"{path} is not a lock file of clusterar (a link or a folder); remove it, or choose another --out"
        )
    return ClusterarError(
        f"cannot write in {folder} ({e.strerror}); choose another --out or make the folder writable"
    )


# ----------------------------------------------------------------------------- who holds it


def _write_holder(fd: int) -> None:
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data + b"\n", 0)


def _parse_holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("since"), int | float):
        return None
    return holder if {"pid", "host"} <= set(holder) else None


def _wait_for_holder(fd: int) -> dict | None:
    """The holder's record: it writes it right after taking the lock, so an empty file is read again
    for a moment (None if it stays empty or unreadable)."""
    for _ in range(20):
        holder = _parse_holder(os.pread(fd, 4096, 0))
        if holder is not None:
            return holder
        time.sleep(0.01)
    return None
