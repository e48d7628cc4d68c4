"""Shared by the benchmark scripts: write one section of benchmarks/RESULTS.md.

Each benchmark owns a section delimited by HTML comments and replaces only that section, so running one
benchmark never erases another's figures. Every section records the command, machine and date.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEvery figure below was written by the script named in its section; rerun it to refresh.\n"


def machine() -> str:
    """One line describing where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with {threads} threads{gpu}"


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
