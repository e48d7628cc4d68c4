"""Shared by the benchmark scripts: write one section of benchmarks/RESULTS.md.

Each benchmark owns a section delimited by HTML comments and replaces only that section, so running one
benchmark never erases another's figures. Every section records the command, machine and date.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterar.runtime import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure below was written by the script named in its section; rerun it to refresh.\n"


def machine() -> str:
    """One line describing where the figures were measured."""
    return describe_machine()


def write_section(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md."""
    date = datetime.date.today().isoformat()
    block = (
        f"<!-- begin {name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {date}\n\n{body.strip()}\n<!-- end {name} -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)
