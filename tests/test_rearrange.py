"""Rearranging ids by a codebook clustering: tokenizer, token files and GPT stay equivalent; inspect runs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from clusterar import ClusterarError
from clusterar.clusters import CodebookClusters, permute_rows, remap_tokens, unmap_tokens
from clusterar.clusters.inspect import ROWS, inspect_clusters, swap_experiment, swap_tokens
from clusterar.clusters.rearrange import (
    export_iar_mapping,
    rearrange_token_file,
    rearrange_token_files,
    rearrange_tokenizer_file,
    rearranged_tokenizer,
)
from clusterar.data import to_float
from clusterar.gpt import GPT, gpt_preset
from clusterar.losses import cluster_logits, cluster_logits_contiguous
from clusterar.tokenizer import VQModel, load_tokenizer, save_tokenizer, vq_preset
from clusterar.tokens import encode_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def make_tokenizer(seed: int) -> VQModel:
    """The "tiny" preset (512 codes, 32x32 images -> 8x8 tokens) with random weights."""
    torch.manual_seed(seed)
    return VQModel(vq_preset("tiny")).eval()


@pytest.fixture(scope="module")
def tok(make_tokenizer) -> VQModel:
    return make_tokenizer(0)


@pytest.fixture(scope="module")
def clusters(tok) -> CodebookClusters:
    return CodebookClusters.fit(tok.quantize.embedding.weight.detach(), "balanced", 64, seed=0)


@pytest.fixture(scope="module")
def kmeans_clusters(tok) -> CodebookClusters:
    return CodebookClusters.fit(tok.quantize.embedding.weight.detach(), "kmeans", 64, seed=0)


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory):
    """The tokenizer saved to disk, and a real token file of the digits val split (2 views)."""
    d = tmp_path_factory.mktemp("rearrange")
    save_tokenizer(tok, d / "tok.safetensors")
    tf = encode_dataset(
        tok, "digits", "val", d / "val.safetensors", image_size=32, views="flip", progress=False
    )
    return d, tf


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("which", ["clusters", "kmeans_clusters"])
def test_rearranged_tokenizer_decodes_remapped_tokens_bit_identically(make_tokenizer, tok, which, request):
    cl = request.getfixturevalue(which)
    new = rearranged_tokenizer(tok, cl)
    assert new is not tok and torch.equal(
        tok.quantize.embedding.weight, make_tokenizer(0).quantize.embedding.weight
    )
    ids = torch.randint(0, 512, (6, 8, 8), generator=torch.Generator().manual_seed(1))
    assert torch.equal(new.decode(remap_tokens(ids, cl)), tok.decode(ids))
    # encoding commutes with the permutation too, and every cluster owns a contiguous id block
    x = to_float(
        torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    )
    assert torch.equal(new.encode(x), remap_tokens(tok.encode(x), cl))
    assert torch.equal(cl.new_labels, torch.sort(cl.labels).values)
    # all weights other than the codebook are untouched
    a, b = tok.state_dict(), new.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "quantize.embedding.weight")


def test_rearranged_tokenizer_refuses_other_codebook(make_tokenizer, clusters):
    with pytest.raises(ClusterarError, match="were computed on codebook"):
        rearranged_tokenizer(make_tokenizer(1), clusters)


def test_rearrange_tokenizer_file(make_tokenizer, tok, clusters, files, tmp_path):
    d, _ = files
    out = rearrange_tokenizer_file(d / "tok.safetensors", clusters, tmp_path / "new")
    assert out == tmp_path / "new" / "tokenizer.safetensors"
    new = load_tokenizer(out)
    ids = torch.randint(0, 512, (3, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(new.decode(remap_tokens(ids, clusters)), tok.decode(ids))
    with pytest.raises(ClusterarError, match="already rearranged"):
        rearrange_tokenizer_file(out, clusters, tmp_path / "again.safetensors")
    with pytest.raises(ClusterarError, match="is the tokenizer itself"):
        rearrange_tokenizer_file(d / "tok.safetensors", clusters, d / "tok.safetensors")
    other = CodebookClusters.fit(make_tokenizer(1).quantize.embedding.weight.detach(), "random", 64)
    with pytest.raises(ClusterarError, match="were computed on codebook"):
        rearrange_tokenizer_file(d / "tok.safetensors", other, tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------- GPT


def test_gpt_with_permuted_rows_gives_permuted_logits(clusters):
    torch.manual_seed(0)
    model = GPT(gpt_preset("tiny", vocab_size=512)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the output starts at zero: make it informative
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for p in (permuted.tok_embeddings.weight, permuted.output.weight):
            p.copy_(permute_rows(p.detach().clone(), clusters))
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(4))
    cond = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        logits = model(tokens[:, :-1], cond)
        new = permuted(remap_tokens(tokens[:, :-1], clusters), cond)
    assert logits.shape == (3, 64, 512)
    # The embedding lookup and every layer see identical numbers; each output logit is the same dot
    # product of the same hidden state with the same weight row, only at another column: exact.
    assert torch.equal(new, logits[..., clusters.inverse])
    assert torch.equal(new[..., clusters.perm], logits)
    # IAR's contiguous cluster logits in the new id space = cluster logits by labels in the old one
    m = clusters.block_size
    assert torch.allclose(
        cluster_logits_contiguous(new, m),
        cluster_logits(logits, clusters.labels, clusters.n_clusters),
        atol=1e-5,
    )


# ----------------------------------------------------------------------------- token files


def test_rearrange_token_file_round_trip(tok, clusters, files, tmp_path):
    _, tf = files
    out = rearrange_token_file(tf.path, clusters, tmp_path / "val.safetensors", tok)
    assert out.codes.dtype == tf.codes.dtype == np.int16 and out.codes.shape == tf.codes.shape == (
        len(tf),
        2,
        64,
    )
    assert np.array_equal(out.codes, remap_tokens(np.asarray(tf.codes), clusters))
    assert np.array_equal(unmap_tokens(np.asarray(out.codes), clusters), tf.codes)  # the round trip
    assert np.array_equal(out.labels, tf.labels)
    assert out.meta["permutation"]["clusters_fingerprint"] == clusters.fingerprint()
    assert out.meta["permutation"]["original_tokenizer_fingerprint"] == tok.fingerprint()
    same = {"grid", "views", "dataset", "split", "class_names", "codebook_size", "image_size", "skipped"}
    assert all(out.meta[k] == tf.meta[k] for k in same)
    # the copy pairs with the rearranged tokenizer, and decodes to the same images as the original
    new = rearranged_tokenizer(tok, clusters)
    out.check_tokenizer(new)
    with pytest.raises(ClusterarError, match="encoded by tokenizer"):
        out.check_tokenizer(tok)
    rows = np.arange(0, len(tf), 37)
    assert torch.equal(new.decode(out.batch(rows)[0]), tok.decode(tf.batch(rows)[0]))
    # the rows remapped in chunks equal the whole-file lookup
    import clusterar.clusters.rearrange as rearrange_module

    small = rearrange_module.CHUNK_IDS
    try:
        rearrange_module.CHUNK_IDS = 3 * 128  # 3 rows per chunk: 60 chunks and a partial one
        chunked = rearrange_token_file(tf.path, clusters, tmp_path / "chunked.safetensors", tok)
    finally:
        rearrange_module.CHUNK_IDS = small
    assert np.array_equal(chunked.codes, out.codes)


def test_rearrange_token_file_refusals(make_tokenizer, tok, clusters, kmeans_clusters, files, tmp_path):
    _, tf = files
    out = rearrange_token_file(tf.path, clusters, tmp_path / "val.safetensors", tok)
    with pytest.raises(ClusterarError, match="already remapped"):
        rearrange_token_file(out.path, clusters, tmp_path / "twice.safetensors", tok)
    other = CodebookClusters.fit(make_tokenizer(1).quantize.embedding.weight.detach(), "balanced", 64)
    with pytest.raises(ClusterarError, match="encoded with codebook .* were computed on codebook"):
        rearrange_token_file(tf.path, other, tmp_path / "other.safetensors", tok)
    with pytest.raises(ClusterarError, match="encoded by tokenizer"):  # same codebook, other weights
        wrong = copy.deepcopy(tok)
        with torch.no_grad():
            wrong.decoder.conv_out.bias.add_(1.0)
        rearrange_token_file(tf.path, clusters, tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ClusterarError, match="is the token file itself"):
        rearrange_token_file(tf.path, clusters, tf.path, tok)
    with pytest.raises(ClusterarError, match="holds the token file"):
        rearrange_token_files([tf.path], clusters, tf.path.parent, tok)
    assert not (tmp_path / "twice.safetensors").exists() and not (tmp_path / "other.safetensors").exists()
    # unequal clusters are fine on disk (kmeans), only IAR's mapping format needs equal blocks
    km = rearrange_token_files([tf.path], kmeans_clusters, tmp_path / "km", tok)[0]
    assert np.array_equal(unmap_tokens(np.asarray(km.codes), kmeans_clusters), tf.codes)
    with pytest.raises(ClusterarError, match="equal-size clusters"):
        export_iar_mapping(kmeans_clusters, tmp_path / "m.pt")


def test_export_iar_mapping_round_trip(tok, clusters, tmp_path):
    path = export_iar_mapping(clusters, tmp_path / "mapping.pt")
    mapping = torch.load(path, weights_only=True)
    assert mapping.dtype == torch.int64 and mapping.shape == (512,)
    assert torch.equal(mapping, clusters.perm)
    back = CodebookClusters.from_iar_mapping(
        path, tok.quantize.embedding.weight.detach(), clusters.block_size
    )
    assert torch.equal(back.labels, clusters.labels) and torch.equal(back.perm, clusters.perm)


# ----------------------------------------------------------------------------- inspect


def test_swap_tokens_stays_in_or_leaves_the_cluster(kmeans_clusters):
    labels = kmeans_clusters.labels
    sizes = kmeans_clusters.sizes
    ids = torch.arange(512).repeat(20).reshape(20, 16, 32)  # every code 20 times
    gen = torch.Generator().manual_seed(0)
    same = swap_tokens(ids, labels, True, gen)
    other = swap_tokens(ids, labels, False, gen)
    assert same.shape == ids.shape and same.dtype == ids.dtype
    assert torch.equal(labels[same], labels[ids])
    alone = sizes[labels[ids]] == 1
    assert torch.equal(same == ids, alone)  # a code changes exactly when its cluster has another member
    assert not (labels[other] == labels[ids]).any()
    # uniform over the other members: a token of a cluster of size s hits each of the s-1 others
    c = int(torch.argmax(sizes))
    t = int((labels == c).nonzero()[0])
    draws = swap_tokens(torch.full((7000,), t), labels, True, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=512)
    members = (labels == c).nonzero()[:, 0]
    assert counts[t] == 0 and int(counts.sum()) == int(counts[members].sum())
    expected = 7000 / (int(sizes[c]) - 1)
    assert (counts[members[members != t]] - expected).abs().max() < 6 * math.sqrt(expected)
    # the same generator state gives the same swaps
    a = swap_tokens(ids, labels, False, torch.Generator().manual_seed(5))
    assert torch.equal(a, swap_tokens(ids, labels, False, torch.Generator().manual_seed(5)))


def test_swap_tokens_needs_two_clusters(tok):
    one = CodebookClusters.fit(tok.quantize.embedding.weight.detach(), "balanced", 1)
    with pytest.raises(ClusterarError, match="at least two non-empty clusters"):
        swap_tokens(torch.zeros(2, 4, dtype=torch.long), one.labels, False, torch.Generator())


def test_inspect_clusters_writes_its_files(make_tokenizer, tok, clusters, tmp_path):
    figures = inspect_clusters(clusters, tok, "digits", 32, tmp_path / "insp", n_images=12, seed=0)
    assert sorted(p.name for p in (tmp_path / "insp").iterdir()) == [
        "clusters.png",
        "inspect.json",
        "swap.png",
    ]
    assert json.loads((tmp_path / "insp" / "inspect.json").read_text()) == figures
    assert figures["images"] == 12 and figures["n_clusters"] == 64 and figures["sizes"]["min"] == 8
    for k in ("reconstruction", "same_cluster", "other_cluster"):
        assert math.isfinite(figures["vs_original"][k]["psnr"])
    assert math.isfinite(figures["vs_reconstruction"]["same_cluster"]["psnr"])
    assert figures["tokens_changed"]["same_cluster"] == 1.0  # balanced clusters of 8: every token moves
    # same-cluster swaps stay closer in code space than other-cluster ones
    assert figures["code_distance"]["same_cluster"] < figures["code_distance"]["other_cluster"]
    with pytest.raises(ClusterarError, match="were computed on codebook"):
        inspect_clusters(clusters, make_tokenizer(1), "digits", 32, tmp_path / "x", n_images=4)


def test_swap_experiment_picture_and_batching(tok, clusters):
    f1, pic = swap_experiment(clusters, tok, "digits", 32, n_images=10, seed=3, batch_size=4, show=5)
    f2, _ = swap_experiment(clusters, tok, "digits", 32, n_images=10, seed=3, batch_size=10, show=5)
    assert pic.shape == (len(ROWS) * 5, 3, 32, 32) and pic.dtype == torch.uint8
    # rows: originals, reconstruction = decode(encode(originals)), then the two swaps
    recon = tok.decode(tok.encode(to_float(pic[:5])))
    assert torch.equal(pic[5:10], ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    # the batch size changes no figure that does not depend on the random draws (up to float rounding:
    # the decoder's convolutions may take other code paths for other batch sizes)
    for key in ("psnr", "mse"):
        a, b = f1["vs_original"]["reconstruction"][key], f2["vs_original"]["reconstruction"][key]
        assert a == pytest.approx(b, rel=1e-5)
