"""`clusterar serve`: a local page to sample from models side by side."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .flags import add_compute_flags, add_flag


def cmd_serve(args: argparse.Namespace) -> None:
    from ..runtime import pick_device
    from ..serve import serve

    serve(args.sources, host=args.host, port=args.port, device=pick_device(args.device))


def add_parsers(sub: argparse._SubParsersAction, full: Callable[[str], bool]) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to sample from models side by side",
        description="Serve a page (offline: nothing from the internet) where you pick models, a class, CFG, "
        "temperatures, top-k/top-p, CTF's stage 2 and a seed, and see a grid of samples per model (CTF: with "
        "its map of coarse labels). Sampling requests run one at a time; the page stays responsive.",
    )
    p.set_defaults(func=cmd_serve)
    if full("serve"):
        add_compute_flags(p, progress=False)
        p.add_argument("sources", nargs="+", help="run folders, model files or CTF pipeline JSONs")
        add_flag(p, "host", "127.0.0.1", said="127.0.0.1, this machine only")
        add_flag(p, "port", 8000)
