"""`clusterar cluster fit / export / inspect / rearrange` through main([...]): files, round trips, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clusterar import ClusterarError
from clusterar.cli import main
from clusterar.clusters import CodebookClusters, remap_tokens
from clusterar.tokenizer import load_tokenizer, save_tokenizer
from clusterar.tokens import TokenFile, encode_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(make_tokenizer, tmp_path_factory):
    """Two tiny random tokenizers (512 codes, 8x8 tokens) on disk and balanced clusters of the first."""
    d = tmp_path_factory.mktemp("cluster-cli")
    for seed, name in ((0, "tok.safetensors"), (1, "other.safetensors")):
        save_tokenizer(make_tokenizer(seed), d / name)
    torch.set_num_threads(1)
    args = ["cluster", "fit", "--tokenizer", str(d / "tok.safetensors"), "--method", "balanced"]
    assert main([*args, "--clusters", "64", "--out", str(d / "balanced.safetensors"), "--threads", "1"]) == 0
    return d


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fit_writes_clusters_and_prints_summary(work, tmp_path, capsys):
    tok = work / "tok.safetensors"
    kmeans = ["cluster", "fit", "--tokenizer", tok, "--method", "kmeans", "--clusters", 32, "--out"]
    rc, out, err = run([*kmeans, tmp_path / "k.st"], capsys)
    assert rc == 0 and err == ""
    c = CodebookClusters.load(tmp_path / "k.st")
    assert c.method == "kmeans" and c.n_clusters == 32 and c.num_codes == 512 and int(c.sizes.sum()) == 512
    c.check_codebook(load_tokenizer(tok).quantize.embedding.weight)
    assert "kmeans: 32 clusters of 512 codes" in out and "objective" in out and "converged" in out
    assert f"{c.objective:.6g}" in out
    # the same seed gives the same clusters; the balanced file from the fixture is balanced
    run([*kmeans, tmp_path / "k2.st"], capsys)
    assert torch.equal(CodebookClusters.load(tmp_path / "k2.st").labels, c.labels)
    b = CodebookClusters.load(work / "balanced.safetensors")
    assert b.is_balanced and b.block_size == 8 and b.method == "balanced"


def test_bare_cluster_command_is_fit(work, tmp_path, capsys):
    out = tmp_path / "b.safetensors"
    rc, text, _ = run(
        [
            "cluster",
            "--tokenizer",
            work / "tok.safetensors",
            "--method",
            "balanced",
            "--clusters",
            64,
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 0 and "written" in text
    assert torch.equal(
        CodebookClusters.load(out).labels, CodebookClusters.load(work / "balanced.safetensors").labels
    )
    rc, _, err = run(["cluster"], capsys)
    assert rc == 2 and "needs --tokenizer, --clusters, --out, --method (or --from-iar)" in err


def test_export_and_from_iar_round_trip(work, tmp_path, capsys):
    mapping = tmp_path / "mapping.pt"
    rc, _, _ = run(["cluster", "export", work / "balanced.safetensors", "--out", mapping], capsys)
    assert rc == 0
    b = CodebookClusters.load(work / "balanced.safetensors")
    m = torch.load(mapping, weights_only=True)
    assert m.dtype == torch.int64 and m.shape == (512,) and torch.equal(m, b.perm)
    out = tmp_path / "iar.safetensors"
    tok = work / "tok.safetensors"
    rc, text, _ = run(
        ["cluster", "fit", "--tokenizer", tok, "--from-iar", mapping, "--clusters", 64, "--out", out], capsys
    )
    assert rc == 0 and "iar-file: 64 clusters" in text
    back = CodebookClusters.load(out)
    assert back.method == "iar-file" and torch.equal(back.labels, b.labels) and torch.equal(back.perm, b.perm)
    assert back.objective == pytest.approx(b.objective, rel=1e-12)
    # and out again: the same file content
    rc, _, _ = run(["cluster", "export", out, "--out", tmp_path / "again.pt"], capsys)
    assert rc == 0 and torch.equal(torch.load(tmp_path / "again.pt", weights_only=True), m)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--method", "balanced", "--clusters", "100"],
            "not divisible by n_clusters=100; the nearest valid values are 64 or 128",
        ),
        (["--method", "kmeans", "--clusters", "1000"], "between 1 and the number of codes K=512, got 1000"),
        (
            ["--method", "random", "--clusters", "8", "--restarts", "2"],
            "--restarts applies to --method kmeans",
        ),
    ],
)
def test_fit_bad_input_exits_2(work, tmp_path, capsys, args, message):
    out = tmp_path / "x.safetensors"
    rc, _, err = run(["cluster", "fit", "--tokenizer", work / "tok.safetensors", *args, "--out", out], capsys)
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_from_iar_bad_input_exits_2(work, tmp_path, capsys):
    tok = work / "tok.safetensors"
    bad = tmp_path / "bad.pt"
    torch.save(torch.arange(256), bad)  # a mapping for another codebook size
    rc, _, err = run(
        ["cluster", "fit", "--tokenizer", tok, "--from-iar", bad, "--clusters", 64, "--out", tmp_path / "x"],
        capsys,
    )
    assert rc == 2 and "has 256 entries but the codebook has 512 codes" in err
    good = tmp_path / "good.pt"
    torch.save(torch.randperm(512), good)
    rc, _, err = run(
        [
            "cluster",
            "fit",
            "--tokenizer",
            tok,
            "--from-iar",
            good,
            "--clusters",
            100,
            "--out",
            tmp_path / "x",
        ],
        capsys,
    )
    assert rc == 2 and "--clusters 100 does not split the tokenizer's 512 codes" in err


def test_export_refuses_unequal_clusters(work, tmp_path, capsys):
    k = tmp_path / "k.safetensors"
    run(
        [
            "cluster",
            "fit",
            "--tokenizer",
            work / "tok.safetensors",
            "--method",
            "kmeans",
            "--clusters",
            64,
            "--out",
            k,
        ],
        capsys,
    )
    rc, _, err = run(["cluster", "export", k, "--out", tmp_path / "m.pt"], capsys)
    assert rc == 2 and "needs equal-size clusters" in err and not (tmp_path / "m.pt").exists()


def test_inspect_writes_files_and_table(work, tmp_path, capsys):
    out = tmp_path / "inspect"
    rc, text, _ = run(
        ["cluster", "inspect", work / "balanced.safetensors", "--tokenizer", work / "tok.safetensors",
         "--data", "digits", "--n", 8, "--out", out, "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"swap.png", "clusters.png", "inspect.json"}
    figures = json.loads((out / "inspect.json").read_text())
    assert figures["images"] == 8 and figures["clusters_file"] == str(work / "balanced.safetensors")
    assert "same-cluster" in text and "other-cluster" in text and "PSNR" in text
    assert f"{figures['vs_original']['same_cluster']['psnr']:.2f}" in text
    # a tokenizer other than the one clustered is refused
    rc, _, err = run(
        ["cluster", "inspect", work / "balanced.safetensors", "--tokenizer", work / "other.safetensors",
         "--data", "digits", "--n", 4, "--out", tmp_path / "x"],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "were computed on codebook" in err and not (tmp_path / "x").exists()


def test_rearrange_tokenizer_and_tokens(work, tmp_path, capsys):
    tok = load_tokenizer(work / "tok.safetensors")
    src = tmp_path / "tokens" / "val.safetensors"
    tf = encode_dataset(tok, "digits", "val", src, image_size=32, views="none", progress=False)
    b = work / "balanced.safetensors"
    rc, text, _ = run(
        ["cluster", "rearrange", b, "--tokenizer", work / "tok.safetensors", "--out", tmp_path / "newtok",
         "--tokens", src, "--out-dir", tmp_path / "new"],
        capsys,
    )  # fmt: skip
    assert rc == 0 and text.count("written") == 2
    clusters = CodebookClusters.load(b)
    new_tok = load_tokenizer(tmp_path / "newtok")
    new = TokenFile.open(tmp_path / "new" / "val.safetensors")
    assert np.array_equal(new.codes, remap_tokens(np.asarray(tf.codes), clusters))
    new.check_tokenizer(new_tok)
    rows = np.arange(0, len(tf), 50)
    assert torch.equal(new_tok.decode(new.batch(rows)[0]), tok.decode(tf.batch(rows)[0]))
    # errors: nothing to do, --tokens without --out-dir, clusters of another tokenizer
    rc, _, err = run(["cluster", "rearrange", b, "--tokenizer", work / "tok.safetensors"], capsys)
    assert rc == 2 and "needs --out" in err
    rc, _, err = run(
        ["cluster", "rearrange", b, "--tokenizer", work / "tok.safetensors", "--tokens", src], capsys
    )
    assert rc == 2 and "--tokens and --out-dir go together" in err
    rc, _, err = run(
        ["cluster", "rearrange", b, "--tokenizer", work / "other.safetensors", "--out", tmp_path / "o"],
        capsys,
    )
    assert rc == 2 and "were computed on codebook" in err


def test_fit_hierarchical_for_ctf(work, tmp_path, capsys):
    """`--method hierarchical`: exactly M clusters, unequal sizes, the same file twice; CTF trains on it and
    IAR's rearranged ids refuse it."""
    tok = work / "tok.safetensors"
    args = ["cluster", "fit", "--tokenizer", tok, "--method", "hierarchical", "--clusters", 24]
    rc, out, err = run([*args, "--out", tmp_path / "h.st"], capsys)
    assert rc == 0 and err == "" and "hierarchical: 24 clusters of 512 codes" in out
    c = CodebookClusters.load(tmp_path / "h.st")
    assert c.method == "hierarchical" and c.labels.unique().numel() == 24 and not c.is_balanced
    run([*args, "--out", tmp_path / "h2.st"], capsys)
    assert torch.equal(CodebookClusters.load(tmp_path / "h2.st").labels, c.labels)
    from clusterar.methods import Method

    Method("ctf-coarse", 512, c)  # CTF takes it
    with pytest.raises(ClusterarError, match="equal-size clusters"):
        Method("iar", 512, c)
