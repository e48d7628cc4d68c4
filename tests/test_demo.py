"""`clusterar demo --quick` end to end: every stage runs, the report exists, a rerun reuses the stages."""

from __future__ import annotations

import re

from clusterar.cli import main


def test_quick_demo_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    report = (out / "report.md").read_text()
    assert "val PSNR" in report
    psnr = float(re.search(r"\| val PSNR \(dB\) \| ([\d.]+) \|", report).group(1))
    assert 5 < psnr < 60
    for name in (
        "tokenizer/recon.png",
        "tokenizer/curves.png",
        "tokens/train.safetensors",
        "tokens/val.safetensors",
    ):
        assert (out / name).exists(), name
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert "tokenizer: reusing" in log and log.count("tokens: reusing") == 2
