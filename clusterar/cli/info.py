"""`clusterar info`: the metadata of a clusterar file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def cmd_info(args: argparse.Namespace) -> None:
    from ..fileio import read_meta

    meta = read_meta(args.file)
    for key in ("class_names",):
        if isinstance(meta.get(key), list) and len(meta[key]) > 12:
            meta[key] = meta[key][:12] + [f"... ({len(meta[key])} in all)"]
    print(json.dumps(meta, indent=2))


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "info", help="print the metadata of a clusterar file (tokenizer, token file, checkpoint)"
    )
    p.set_defaults(func=cmd_info)
    if full("info"):
        p.add_argument("file")
