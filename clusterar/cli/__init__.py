"""The `clusterar` command. Each subcommand is a thin layer over a library function, in the module of its
group with its parser beside it (tokenizer, encode, cluster, train, convert, sample, evaluate, experiment,
serve, info); every flag comes from `flags.add_flag`.

Only the command given is built with its flags: the others are a name and a line of help, so `clusterar
--help` imports no torch. Errors in the user's input (ClusterarError) are printed as one clear message
with exit status 2, never a traceback; Ctrl-C says how to resume, and so does SIGTERM (what Slurm and
Kubernetes send before they kill a job), handled as Ctrl-C by `clusterar.stopping` (training loops first
write the checkpoint of the step they reached) with exit status 143, 128 + SIGTERM, as schedulers report
a job they ended.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading

from ..errors import ClusterarError
from ..stopping import Terminated, on_sigterm
from . import cluster, convert, encode, evaluate, experiment, info, sample, serve, tokenizer, train
from .flags import add_flag
from .paths import check_paths

__all__ = ["build_parser", "main"]

# Each adds its command(s) to the subparsers, in the order of `clusterar --help`.
ADD_PARSERS = (
    experiment.add_parsers,  # demo, experiment
    tokenizer.add_parsers,
    encode.add_parsers,
    cluster.add_parsers,
    train.add_parsers,
    evaluate.add_parsers,
    sample.add_sample_parser,
    convert.add_parsers,
    serve.add_parsers,
    sample.add_pipeline_parser,
    info.add_parsers,
)
RERUN_AGAIN = ("demo", "experiment", "sample", "encode")  # continue by rerunning, not with --resume


class Parser(argparse.ArgumentParser):
    """argparse with clusterar's error style: one line, exit status 2, and where to read more."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser ("*"), or one where COMMAND alone has its flags and the other commands only
    their name and help: building a command's flags may import the library (its presets, methods,
    config dataclasses: torch, seconds), which `clusterar --help` need not wait for. None: only the list
    of commands."""

    def full(name: str) -> bool:
        return command in ("*", name)

    parser = Parser(
        prog="clusterar",
        description="Cluster-aware autoregressive image generation: LlamaGen baseline, IAR and CTF on one stack.",
    )
    add_flag(parser, "verbose", names=("-v", "--verbose"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parsers in ADD_PARSERS:
        add_parsers(sub, full)
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _main(argv)
    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a reader that went away is said below
        return code
    except BrokenPipeError:
        # stdout's reader went away (`| head`): stop as Unix tools do, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        print("output closed (broken pipe); stopped: run the same command again to continue", file=sys.stderr)
        return 141  # 128 + SIGPIPE, as the shell reports a pipeline's writer that was cut off
    except Terminated:  # while the command was being parsed: nothing started, nothing to keep
        print("\nterminated (SIGTERM) before the command started", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, before)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        _setup(args)  # imports torch with --threads: seconds in which a SIGTERM is said as below
        from tqdm.contrib.logging import logging_redirect_tqdm

        check_paths(parser, args)
        with logging_redirect_tqdm():  # warnings on their own line, never after a progress bar's \r
            args.func(args)
    except ClusterarError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep only our message
            msg = msg.rsplit("ClusterarError: ", 1)[-1].strip()
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:
        # A write that failed mid-way (disk full, a folder turned read-only): say which file, not where.
        from ..fileio import WRITE_ERRNOS

        if e.errno == errno.ENAMETOOLONG:  # a path given to any command, read or written
            print(
                f"error: {e.filename}: {e.strerror} (a file or folder name may have at most 255 bytes); "
                "check the path",
                file=sys.stderr,
            )
            return 2
        if e.errno not in WRITE_ERRNOS:
            raise
        print(
            f"error: cannot write {e.filename or 'an output file'} ({e.strerror}); free some space or "
            "choose another --out",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:
        again = "again" if args.command in RERUN_AGAIN else "with --resume"
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(
            f"\n{what}; finished checkpoints are kept: run the same command {again} to continue",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) else 130
    return 0
