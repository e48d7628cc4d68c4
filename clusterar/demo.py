"""`clusterar demo`: the main job, the shipped experiment spec `demo` on the bundled MNIST digits.

tokenizer -> token files -> clusters -> baseline, IAR and CTF (same budget and seed) -> samples ->
FID / IS / precision / recall -> runs/demo/report.md. 8.5 to 11 minutes on 2 CPU cores; every stage is
reused when the command is run again (an interrupted stage resumes). `--quick` runs the minute-sized
spec `quick` (tiny models on the digits set) instead. See clusterar/specs/demo.toml for the settings.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .experiment import load_spec, run_experiment


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, device: str | None = None, progress: bool = True
) -> Path:
    spec = load_spec("quick" if quick else "demo")
    if device is not None:
        spec.device = device
    command = "clusterar demo" + (" --quick" if quick else "") + f" --out {shlex.quote(str(out))}"
    return run_experiment(spec, out, progress=progress, command=command)
