"""`benchmarks/bench_gpu.py --reduced`: the GPU benchmark's whole path (ceilings, four training methods,
three sampling methods, floors) on tiny sizes and the CPU, so that it cannot rot between the rare runs on
a lent GPU; it writes nothing."""

from __future__ import annotations

import re

import pytest

from benchmarks._results import RESULTS
from benchmarks.bench_gpu import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reduced_run_measures_every_method_beside_its_floor():
    before = RESULTS.read_bytes()
    body = main(["--reduced", "--device", "cpu", "--no-compile"])
    train = re.findall(
        r"^\| cpu-xs \| (\S+) \| [\d.]+M \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|$", body, re.M
    )
    assert [t[0] for t in train] == ["baseline", "iar", "ctf-coarse", "ctf-refiner"]
    sample = re.findall(
        r"^\| (\w+) \| eager \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|$", body, re.M
    )
    assert [s[0] for s in sample] == ["baseline", "iar", "ctf"]
    for _, rate, ms, floor_ms, _ in sample:  # images/s and ms per batch of 2 images agree; a floor is set
        assert float(rate) > 0 and abs(2000 / float(ms) - float(rate)) < 0.06 * float(rate)
        assert float(floor_ms) > 0
    assert "skipped by the budget guard" not in body
    assert RESULTS.read_bytes() == before  # --reduced writes nothing


def test_the_budget_guard_skips_and_says_so():
    body = main(["--reduced", "--device", "cpu", "--no-compile", "--minutes", "0"])
    assert "skipped by the budget guard: training cpu-xs baseline" in body
    assert "sampling ctf eager" in body
