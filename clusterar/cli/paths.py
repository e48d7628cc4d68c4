"""Where a command reads and writes, checked before any work: an output that cannot be written, or that
is of the wrong kind (a file where a folder is written, a folder where a file is), or that names one of
the command's own inputs, is one line at once, not a traceback after an hour of training, nor a tokenizer
silently replaced by a clusters file.

What each flag and positional argument is on disk is declared once, in `flags.FLAGS` (`Flag.path`, a
command's own kind of --out through add_flag's `path`); this module reads it from the parser of the
command given.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ClusterarError
from .flags import READS, READS_NAMED, WRITES


def folder_input_files() -> tuple[str, ...]:
    """The files an input folder is read for (a run folder's model, a tokenizer's run folder, a CTF
    pipeline folder): an output of that name in that folder replaces the input as surely as naming it."""
    from ..model_file import MODEL_FILE
    from ..tokenizer import TOKENIZER_FILE

    return (MODEL_FILE, TOKENIZER_FILE, "pipeline.json")


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the command given: `clusterar cluster fit` is cluster's fit."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, sub.dest, None) if sub is not None else None
        if name is None:
            return parser
        parser = sub.choices[name]


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest.upper()


def _paths(kind: str | None, value: object) -> list[Path]:
    """The paths an input flag's value names: each of a list (nargs); READS_NAMED: PATH of folder:PATH."""
    values = [str(v) for v in (value if isinstance(value, list | tuple) else [value]) if v]
    if kind == READS_NAMED:
        return [Path(v.split("folder:", 1)[1]) for v in values if "folder:" in v]
    return [Path(v) for v in values] if kind == READS else []


def _replaces(out: Path, inp: Path) -> str | None:
    """How writing `out` would replace input `inp` (None: it would not): it is the same file or folder
    (also through a symlink or a hard link: st_dev and st_ino), or the file an input folder is read for."""
    try:
        if not (out.exists() and inp.exists()):
            return None
        if os.path.samefile(out, inp):
            return "the same folder" if inp.is_dir() else "the same file"
        if inp.is_dir() and out.name in folder_input_files() and os.path.samefile(out.parent, inp):
            return f"the {out.name} it reads"
    except OSError:  # an input that cannot be looked at (a name too long): its command says so
        pass
    return None


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an output the command cannot write, of the wrong kind, or that would
    replace one of its inputs."""
    from ..fileio import check_writable

    actions = command_parser(parser, args)._actions
    inputs = [
        (_flag(a), p) for a in actions for p in _paths(getattr(a, "path", None), getattr(args, a.dest, None))
    ]
    for action in actions:
        kind, value = getattr(action, "path", None), getattr(args, action.dest, None)
        if kind not in WRITES or not value:
            continue
        flag, out = _flag(action), Path(value)
        check_writable(out, flag, kind)
        for source, inp in inputs:
            how = _replaces(out, inp)
            if how:
                raise ClusterarError(
                    f"{flag} {out} would replace {source} {inp} ({how}): an output never overwrites an "
                    f"input; choose another {flag}"
                )
