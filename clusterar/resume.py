"""Resumable work: the settings of a piece of work, stored beside it and compared on the next run.

Every long job of clusterar (tokenizer and transformer training, encoding, sampling to a folder, the
stages of an experiment, the speed measurement) keeps a record of the settings it runs with next to what
it writes: a JSON file written atomically (`Record`), or the metadata of a training checkpoint. The next
run compares its settings with the record's, under ONE policy:

- no record: the work starts;
- the same settings: the work continues where it stopped (or a finished result is reused);
- other settings: refused, with a message that names each differing setting (saved, now) and what to do
  (`SettingsDiffer`), unless the caller starts over because the user asked for it (`restart=True`, from
  an explicit flag or argument; or the names of the settings whose change is itself that request, such
  as a budget that grew, for which an earlier measurement no longer holds).

Paths in the settings that lie inside the record's `root` (an experiment's folder) are compared and stored
relative to it, so a folder copied or moved elsewhere keeps its records.

Settings that may change between sessions without changing the result (how a session runs: device,
workers, progress bars; a training budget that may grow) are named by the caller as `free`: they are
stored but not compared. Only the settings of `now` are compared, so a record may keep other fields (a
field of an older version, bookkeeping such as progress counters) without standing in the way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ClusterarError
from .fileio import read_json, write_json
from .runtime import notice

__all__ = ["Record", "SettingsDiffer", "check_settings", "differences", "relative_to_root"]


def differences(
    saved: Mapping[str, Any], now: Mapping[str, Any], free: Collection[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """{name: (saved, now)} for every setting of `now` (as JSON stores it) whose saved value differs,
    except the `free` ones."""
    now = json.loads(json.dumps(dict(now), default=str))  # tuples as lists, paths as strings: as stored
    return {k: (saved.get(k), v) for k, v in now.items() if k not in free and saved.get(k) != v}


def relative_to_root(value: Any, root: str | os.PathLike) -> Any:
    """`value` (JSON: nested dicts and lists) with every path string that lies inside folder `root`
    written relative to it; other values as they are."""
    if isinstance(value, dict):
        return {k: relative_to_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to_root(v, root) for v in value]
    if not isinstance(value, str) or os.sep not in value:
        return value
    base, full = os.path.abspath(root), os.path.abspath(value)
    return os.path.relpath(full, base) if os.path.commonpath([base, full]) == base and full != base else value


class SettingsDiffer(ClusterarError):
    """A record's work was made with other settings than this run's: the policy's refusal."""

    def __init__(self, where: str | Path, what: str, diff: dict[str, tuple[Any, Any]], todo: str):
        said = "; ".join(f"{k}: saved {s!r}, now {n!r}" for k, (s, n) in diff.items())
        super().__init__(
            f"{where} holds {what} made with other settings: settings differ (saved, now): {said}. {todo}"
        )
        self.diff = diff


def check_settings(
    where: str | Path,
    what: str,
    saved: Mapping[str, Any],
    now: Mapping[str, Any],
    todo: str,
    free: Collection[str] = (),
) -> None:
    """Refuse (`SettingsDiffer`) when `now` differs from `saved` in a setting that is not `free`."""
    diff = differences(saved, now, free)
    if diff:
        raise SettingsDiffer(where, what, diff, todo)


@dataclass(frozen=True)
class Record:
    """The settings of one piece of work, in a JSON file beside it (see the module docstring).

    The settings sit under `key` in the file ({"settings": ..., "result": ...} for an experiment stage),
    or are the whole file (`key=None`). `what` names the work in messages ("the clusters fit", "samples")
    and `todo` says what to do instead when it is refused; `free` names the settings that are not
    compared (they may differ between sessions); paths inside `root` are kept relative to it.
    """

    path: Path
    what: str
    todo: str
    key: str | None = "settings"
    free: tuple[str, ...] = ()
    root: Path | None = None

    def portable(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """`settings` as stored (JSON types), paths inside `root` relative to it."""
        stored = json.loads(json.dumps(dict(settings), default=str))
        return stored if self.root is None else relative_to_root(stored, self.root)

    def read(self) -> dict[str, Any] | None:
        """The record's content, None when there is none (a damaged one is a `FileError`)."""
        if not self.path.exists():
            return None
        return read_json(self.path, f"{self.what} record")

    def settings(self, content: Mapping[str, Any]) -> Mapping[str, Any]:
        return content if self.key is None else (content.get(self.key) or {})

    def check(
        self, now: Mapping[str, Any], restart: bool | Collection[str] = False, where: str | Path | None = None
    ) -> dict[str, Any] | None:
        """The stored record when it was made with the settings `now`; None when there is none, or when
        the settings differ and the caller starts over (`restart`: True, or the names of the settings
        whose change is a request to start over), after saying so and removing it; otherwise refuse
        (`SettingsDiffer`, naming `where`, the record's path by default)."""
        content = self.read()
        if content is None:
            return None
        diff = differences(self.portable(self.settings(content)), self.portable(now), self.free)
        if not diff:
            return content
        if restart is True or (restart and set(diff) <= set(restart)):
            notice(f"{self.path}: {', '.join(diff)} changed; starting {self.what} over")
            self.path.unlink(missing_ok=True)
            return None
        raise SettingsDiffer(where if where is not None else self.path, self.what, diff, self.todo)

    def write(self, now: Mapping[str, Any], **rest: Any) -> None:
        """Store the settings `now` (under `key`, beside the `rest` fields), atomically."""
        now = self.portable(now)
        write_json(self.path, now if self.key is None else {self.key: now, **rest})
