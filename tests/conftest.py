"""Shared test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny ops: on a shared 2-core machine a second thread only adds
    synchronisation, which can cost ~50x. Modules opt in with `pytestmark = usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun_command(args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*cmd, "-m", "clusterar", "train", *args]


@pytest.fixture(scope="session")
def torchrun_command():
    """The command line `torchrun --standalone --nproc_per_node 2 -m clusterar train ARGS` (this Python)."""
    return _torchrun_command


@pytest.fixture(scope="session")
def torchrun():
    """Run `clusterar train ARGS` in 2 gloo processes under torchrun, one thread each; `env` adds variables."""

    def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
        return subprocess.run(
            _torchrun_command(args), cwd=cwd, env=full, capture_output=True, text=True, timeout=300
        )

    return run
