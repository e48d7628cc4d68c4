"""The hook of the kill tests (tests/test_kill.py), and nothing else: it exists so that those tests can
SIGKILL a command at a named place and check that running it again loses nothing.

`kill_point` does nothing unless the environment variable CLUSTERAR_KILL_AT is set; production code calls
it at the places listed in its docstring.
"""

from __future__ import annotations

import os
import signal


def _parse_kill_at(value: str | None) -> tuple[str, int, int | None] | None:
    if not value:
        return None
    target, _, rank = value.partition("@")
    name, _, count = target.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"CLUSTERAR_KILL_AT={value!r}: expected NAME:N or NAME:N@RANK with N >= 1")
    return name, int(count), int(rank) if rank else None


_KILL_AT = _parse_kill_at(os.environ.get("CLUSTERAR_KILL_AT"))
_kill_calls = 0


def kill_point(name: str) -> None:
    """A named place where the kill tests (tests/test_kill.py) stop the process dead; nothing otherwise.

    With CLUSTERAR_KILL_AT=NAME:N in the environment, the N-th call of `kill_point(NAME)` sends SIGKILL to
    this process: no exception, no `finally`, no flush of Python buffers, as when the machine's scheduler or
    the OOM killer ends a job (files already written stay in the page cache). NAME:N@R fires only in the
    torchrun process of RANK R. Without the variable (always, outside those tests) a call is one
    comparison. The points:

    - write:FILENAME   every atomic write, its temporary file complete, just before the rename
    - tokenizer.step   `tokenizer train`, after an optimizer step and its log line, before a checkpoint
    - train.step       `train`, after an optimizer step and its log line, before a snapshot or checkpoint
    - encode.batch     `encode`, after a batch (and its progress save, when one was due)
    - encode.cleanup   `encode`, with the token file written, between removing the two partial files
    - sample.batch     `sample`, after a batch's images and part file are written
    - sample.finish    `sample`, with sample.json written, before the parts are removed
    - experiment.stage `experiment`, at the start of each of its 8 stages (N = 2: the tokenizer is done)
    """
    global _kill_calls
    if _KILL_AT is None or name != _KILL_AT[0]:
        return
    if _KILL_AT[2] is not None and int(os.environ.get("RANK", "0")) != _KILL_AT[2]:
        return
    _kill_calls += 1
    if _kill_calls == _KILL_AT[1]:
        os.kill(os.getpid(), signal.SIGKILL)
