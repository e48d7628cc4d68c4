"""Compare two experiment report.json files value by value, for a restructuring that must not change results.

Timings, dates, the machine line and speeds are left out (they differ between any two runs), and each
file's own folder prefix is replaced before paths are compared:

    python benchmarks/compare_reports.py BEFORE/runs/demo-quick/report.json AFTER/runs/demo-quick/report.json

Run the quick demo under `--threads 1` into two empty folders, one per version of the code, and compare.
Prints every difference (exit status 1) or "identical".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TIMING_WORDS = ("date", "machine", "timings", "seconds", "elapsed", "per_s", "time", "speed")


def timing(path: str) -> bool:
    """True for values that measure the run rather than its result."""
    key = path.rsplit(".", 1)[-1]
    return "speed" in path or any(word in key for word in TIMING_WORDS)


def differences(a: Any, b: Any, roots: tuple[str, str], path: str = "") -> list[str]:
    if timing(path):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [
            f"{path}.{k}: only in {'the first' if k in a else 'the second'}" for k in sorted(set(a) ^ set(b))
        ]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], roots, f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: {len(a)} vs {len(b)} items"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            out += differences(x, y, roots, f"{path}[{i}]")
        return out
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.replace(roots[0], "ROOT"), b.replace(roots[1], "ROOT")
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    args = p.parse_args()
    # the folder the demo ran in (ROOT/runs/NAME/report.json) is what differs between the two runs' paths
    roots = tuple(
        str(f.resolve().parents[min(2, len(f.resolve().parents) - 1)]) for f in (args.first, args.second)
    )
    diff = differences(json.loads(args.first.read_text()), json.loads(args.second.read_text()), roots)
    print("\n".join(diff) or "identical (timings, dates, machine and folder prefixes aside)")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
