"""SIGTERM, what Slurm and Kubernetes send some seconds before they kill a job: the CLI installs
`on_sigterm`, which raises `Terminated` (a KeyboardInterrupt, so every command's Ctrl-C handling applies)
unless a training loop has said, with `at_step_boundaries`, that it would rather finish its step. Then the
signal only sets a flag; the loop polls `requested()` after each step, writes its checkpoint at that step
and raises `Terminated` itself, so a scheduler's stop costs no steps at all (not up to --ckpt-every).

Without the CLI (clusterar used as a library) nothing is installed and SIGTERM keeps Python's default.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "at_step_boundaries", "on_sigterm", "requested"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every command's Ctrl-C handling applies to it."""


_loops = 0  # training loops now inside `at_step_boundaries`
_requested = False


def on_sigterm(signum: int, frame: object) -> None:
    """The CLI's SIGTERM handler: a flag for a loop that polls it, else `Terminated` at once."""
    global _requested
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the checkpoint being written
    if _loops:
        _requested = True
        return
    raise Terminated


@contextmanager
def at_step_boundaries() -> Iterator[None]:
    """Within this block SIGTERM only sets the flag that `requested()` returns: the caller polls it at a
    point where its state is whole, saves, and raises `Terminated`."""
    global _loops, _requested
    _loops += 1
    try:
        yield
    finally:
        _loops -= 1
        pending = _requested and not _loops
        if not _loops:
            _requested = False
    if pending:  # arrived after the caller's last poll: stop now, as without the block
        raise Terminated


def requested() -> bool:
    """True once SIGTERM arrived inside `at_step_boundaries`."""
    return _requested
