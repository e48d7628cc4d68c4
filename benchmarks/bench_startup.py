"""How long the `clusterar` command takes to start, next to the cost of importing PyTorch.

`clusterar --help` imports no torch: only the command given is built with its flags (clusterar/cli/:
the others are a name and a line of help), so the command list answers at once. A command whose flags
come from the library (config dataclasses, presets, methods) pays the torch import when it is built, and
a command that computes pays it once, as any PyTorch program does.

    python benchmarks/bench_startup.py            # median of 7 runs each, writes RESULTS.md
    python benchmarks/bench_startup.py --no-write
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _results import write_section

CASES = [
    ("`clusterar --help`", [sys.executable, "-m", "clusterar", "--help"]),
    ("`clusterar info --help`", [sys.executable, "-m", "clusterar", "info", "--help"]),
    (
        "`clusterar train --help` (its flags come from TrainConfig: imports torch)",
        [sys.executable, "-m", "clusterar", "train", "--help"],
    ),
    ("`python -c 'import torch'` (reference)", [sys.executable, "-c", "import torch"]),
    ("`python -c 'pass'` (interpreter alone)", [sys.executable, "-c", "pass"]),
]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    for _, cmd in CASES:  # warm the file cache
        timed(cmd)
    medians = {}
    for _ in range(args.reps):  # interleaved, so that machine noise hits every case alike
        for name, cmd in CASES:
            medians.setdefault(name, []).append(timed(cmd))
    ref = statistics.median(medians[CASES[3][0]])
    lines = ["| command | median wall time | vs importing torch |", "|---|---:|---:|"]
    for name, _ in CASES:
        m = statistics.median(medians[name])
        lines.append(f"| {name} | {m:.2f} s | {m / ref:.2f}x |")
    body = f"Median of {args.reps} interleaved runs of each command (fresh processes, warm file cache).\n\n"
    body += "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("startup", "Command start-up time", "python benchmarks/bench_startup.py", body)


if __name__ == "__main__":
    main()
