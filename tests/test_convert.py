"""clusterar convert / train --init-from: the IAR conversion is exact (logits and samples), CTF's starting
point is built as documented and fine-tunes, and mismatched inputs are refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterar import ClusterarError
from clusterar.cli import main
from clusterar.clusters import CodebookClusters
from clusterar.convert import cluster_means, convert, lsq_head, to_ctf, to_iar
from clusterar.gpt import GPT, export_llamagen, gpt_preset
from clusterar.model_file import ModelInfo, load_model, read_model_info, save_model
from clusterar.sample import Pipeline
from clusterar.tokenizer import save_tokenizer
from clusterar.train import TrainConfig, train, validation_loss
from tests.test_train import CLASSES, GRID, K, M, seeded_tokenizer, token_file, tokenizers_and_clusters

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_model(seed: int = 0, **kw) -> GPT:
    """A tiny baseline with every weight random (the output head too: a trained model's is not zero)."""
    torch.manual_seed(seed)
    model = GPT(gpt_preset("tiny", vocab_size=K, grid_size=GRID, num_classes=CLASSES, **kw))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("convert")
    tok, _ = tokenizers_and_clusters(d, other_clusters="kmeans")
    rng = np.random.default_rng(0)
    # tokens with structure to learn: each class repeats its own 4 codes
    labels = rng.integers(0, CLASSES, 48)
    codes = (labels[:, None, None] * 4 + rng.integers(0, 4, (48, 1, GRID * GRID))) % K
    token_file(d / "train.safetensors", tok, codes, labels)
    # a baseline "trained" run: random weights saved as `clusterar train` would
    save_model(
        d / "base.safetensors",
        _random_model(),
        ModelInfo(
            method="baseline",
            id_space="original",
            tokenizer=str(d / "tok.safetensors"),
            tokenizer_fingerprint=tok.fingerprint(),
            step=10,
            epoch=2.0,
            num_classes=CLASSES,
        ),
    )
    return {
        k: str(d / f"{k}.safetensors") for k in ("tok", "other", "bal", "km", "other-km", "train", "base")
    }


# ----------------------------------------------------------------------------- IAR: exact


def test_iar_conversion_gives_the_same_logits_up_to_the_permutation(files):
    model, cl = _random_model(), CodebookClusters.load(files["bal"])
    iar = to_iar(model, cl)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, K, (3, GRID * GRID - 1), generator=g)
    y = torch.tensor([0, 2, CLASSES])  # the null class too (CFG's unconditional branch)
    with torch.no_grad():
        original = model(ids, y)
        converted = iar(cl.perm[ids], y)
    assert not torch.equal(converted, original)  # the ids really moved
    torch.testing.assert_close(converted[..., cl.perm], original, rtol=0, atol=1e-6)
    # and nothing but the two vocabulary tables changed
    same = {k for k, v in model.state_dict().items() if torch.equal(v, iar.state_dict()[k])}
    assert set(model.state_dict()) - same == {"tok_embeddings.weight", "output.weight"}


def test_iar_conversion_draws_the_same_samples_under_the_same_seed(files, make_tokenizer):
    tok = make_tokenizer(0, codebook_size=K)
    model, cl = _random_model(), CodebookClusters.fit(tok.quantize.embedding.weight.detach(), "balanced", M)
    base = Pipeline(tok, model, ModelInfo(method="baseline"))
    iar = Pipeline(tok, to_iar(model, cl), ModelInfo(method="iar", id_space="rearranged"), clusters=cl)
    y = torch.arange(CLASSES).repeat(2)
    for kw in ({}, {"cfg_scale": 3.0, "temperature": 0.8, "top_k": 20, "top_p": 0.9}):
        a, b = base.sample_tokens(y, seed=5, **kw), iar.sample_tokens(y, seed=5, **kw)
        assert torch.equal(a.ids, b.ids), kw
        assert torch.equal(b.raw, cl.perm[a.ids])  # the IAR model saw and produced rearranged ids
        assert torch.equal(base.decode(a.ids), iar.decode(b.ids))


def test_convert_command_writes_a_sampler_ready_iar_model(files, tmp_path, capsys):
    out = tmp_path / "iar"
    assert (
        main(["convert", files["base"], "--method", "iar", "--clusters", files["bal"], "--out", str(out)])
        == 0
    )
    assert f"--init-from {out}" in capsys.readouterr().out
    meta = read_model_info(out / "model.safetensors")
    assert (meta.method, meta.id_space, meta.step, meta.init_epoch) == (
        "iar",
        "rearranged",
        0,
        2.0,
    )
    assert meta.clusters_fingerprint == CodebookClusters.load(files["bal"]).fingerprint()
    a = Pipeline.load(files["base"]).sample_tokens(torch.arange(CLASSES), seed=3)
    b = Pipeline.load(out).sample_tokens(torch.arange(CLASSES), seed=3)
    assert torch.equal(a.ids, b.ids)


# ----------------------------------------------------------------------------- CTF


def test_ctf_conversion_keeps_the_body_and_builds_cluster_tables(files):
    model, cl = _random_model(), CodebookClusters.load(files["km"])
    coarse, refiner = to_ctf(model, cl)
    assert coarse.config.causal and not refiner.config.causal
    assert (coarse.config.vocab_size, coarse.config.input_vocab_size) == (M, M)
    assert (refiner.config.vocab_size, refiner.config.input_vocab_size) == (K, M)
    emb = model.tok_embeddings.weight
    c0 = cl.labels == 0
    torch.testing.assert_close(coarse.tok_embeddings.weight[0], emb[c0].mean(0))
    torch.testing.assert_close(coarse.output.weight[3], model.output.weight[cl.labels == 3].mean(0))
    assert torch.equal(refiner.tok_embeddings.weight, coarse.tok_embeddings.weight)
    assert torch.equal(refiner.output.weight, model.output.weight)
    body = [k for k in model.state_dict() if k not in ("tok_embeddings.weight", "output.weight")]
    for net in (coarse, refiner):
        assert all(torch.equal(net.state_dict()[k], model.state_dict()[k]) for k in body)
    assert torch.equal(cluster_means(emb, cl), coarse.tok_embeddings.weight)


def test_lsq_head_fits_the_mass_per_cluster_better_than_the_mean(files):
    """Least squares is the best linear head for the centred log-mass on its data: never worse than the mean."""
    model, cl = _random_model(), CodebookClusters.load(files["km"])
    g = torch.Generator().manual_seed(0)
    codes, y = (
        torch.randint(0, K, (16, GRID * GRID), generator=g),
        torch.randint(0, CLASSES, (16,), generator=g),
    )
    onehot = torch.nn.functional.one_hot(cl.labels, M).double()
    with torch.no_grad():
        target = model(codes[:, :-1], y).double().softmax(-1) @ onehot
        target = target.log() - target.log().mean(-1, keepdim=True)

    # the hidden states that both heads see are the ORIGINAL model's (the head is fitted on them)
    hidden: list[torch.Tensor] = []
    hook = model.output.register_forward_hook(lambda m, a, o: hidden.append(a[0]))
    with torch.no_grad():
        model(codes[:, :-1], y)
    hook.remove()
    h = hidden[0].double().reshape(-1, model.config.dim)
    t = target.reshape(-1, M)
    errors = {}
    for head in ("mean", "lsq"):
        rows = (
            lsq_head(model, cl, codes, y, ridge=0.0)
            if head == "lsq"
            else cluster_means(model.output.weight, cl)
        )
        z = h @ rows.double().T
        errors[head] = float(((z - z.mean(-1, keepdim=True)) - t).pow(2).mean())
    assert errors["lsq"] <= errors["mean"] * (1 + 1e-6), errors
    assert errors["lsq"] < 0.9 * errors["mean"], errors  # and here clearly better


def test_fine_tune_from_a_converted_ctf_start(files, tmp_path):
    start = tmp_path / "start"
    paths = convert(files["base"], "ctf", start, clusters=files["km"], head="lsq", tokens=files["train"])
    assert set(paths) == {"coarse", "refiner", "pipeline"}
    Pipeline.load(paths["pipeline"]).sample(torch.arange(CLASSES))  # samplable as converted
    common = dict(
        tokens=files["train"], tokenizer=files["tok"], clusters=files["km"], model="tiny", batch_size=8
    )
    common.update(steps=30, lr=3e-3, dropout=0.0, log_every=5)
    for stage, method in (("coarse", "ctf-coarse"), ("refiner", "ctf-refiner")):
        before = validation_loss(paths[stage], files["train"])["loss"]
        out = tmp_path / stage
        train(TrainConfig(method=method, init_from=str(start / stage), **common), out, progress=False)
        model, meta = load_model(out / "model.safetensors")
        assert meta.init_from == str(paths[stage]) and meta.init_epoch == 2.0
        assert meta.epoch == pytest.approx(30 / 6)  # 48 images, batch 8: own epochs count from 0
        first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        after = validation_loss(out / "model.safetensors", files["train"])["loss"]
        assert after < 0.7 * before, (stage, before, after)
        # it started from the converted weights: a fresh model's zero head scores exactly ln(vocabulary)
        assert abs(first["loss"] - math.log(model.config.vocab_size)) > 0.01, first
    from clusterar.sample import write_ctf_pipeline

    write_ctf_pipeline(tmp_path / "coarse", tmp_path / "refiner", tmp_path / "tuned.json")
    images = Pipeline.load(tmp_path / "tuned.json").sample(torch.arange(CLASSES), seed=0)
    side = GRID * seeded_tokenizer(0).config.downsample
    assert images.shape == (CLASSES, side, side, 3) and images.dtype == torch.uint8


# ----------------------------------------------------------------------------- bad input


def _convert_error(files, tmp_path, *args: str) -> str:
    with pytest.raises(ClusterarError) as e:
        convert(files["base"], *args[:1], tmp_path / "out", **dict(zip(args[1::2], args[2::2], strict=True)))
    assert not (tmp_path / "out").exists()  # refused before any file was written
    return str(e.value)


def test_convert_refuses_mismatched_inputs_before_any_work(files, tmp_path):
    other_vocab = tmp_path / "tok128.safetensors"
    save_tokenizer(_tokenizer_with(128), other_vocab)
    msg = _convert_error(files, tmp_path, "iar", "tokenizer", str(other_vocab), "clusters", files["bal"])
    assert "trained on tokens of tokenizer" in msg and str(other_vocab) in msg  # our files name theirs
    pt = tmp_path / "c2i.pt"  # a LlamaGen checkpoint names no tokenizer: the vocabulary is compared
    export_llamagen(_random_model(), pt)
    with pytest.raises(ClusterarError) as e:
        convert(pt, "iar", tmp_path / "out", tokenizer=other_vocab, clusters=files["bal"], grid_size=GRID)
    assert (
        "predicts 64 tokens" in str(e.value)
        and "128 codes" in str(e.value)
        and str(other_vocab) in str(e.value)
    )
    assert not (tmp_path / "out").exists()
    msg = _convert_error(files, tmp_path, "ctf", "clusters", files["other-km"])
    assert files["other-km"] in msg and files["tok"] in msg and "Recompute the clusters" in msg
    msg = _convert_error(files, tmp_path, "iar", "clusters", files["km"])
    assert "equal-size clusters" in msg
    assert "pass --tokens" in _convert_error(files, tmp_path, "ctf", "clusters", files["km"], "head", "lsq")
    assert "needs --clusters" in _convert_error(files, tmp_path, "iar")


def _tokenizer_with(codes: int):
    from clusterar.tokenizer import VQConfig, VQModel

    torch.manual_seed(0)
    return VQModel(
        VQConfig(
            ch=32,
            ch_mult=(1, 2),
            z_channels=32,
            codebook_size=codes,
            codebook_dim=4,
            enc_res_blocks=1,
            dec_res_blocks=1,
        )
    ).eval()


def test_init_from_refuses_another_method_or_clusters(files, tmp_path):
    convert(files["base"], "iar", tmp_path / "iar", clusters=files["bal"])
    common = dict(tokens=files["train"], tokenizer=files["tok"], model="tiny", batch_size=8, steps=1)
    cases = [
        (
            dict(method="baseline", init_from=str(tmp_path / "iar")),
            "is a 'iar' model and --method is baseline",
        ),
        (dict(method="iar", clusters=files["km"], rearrange=False, init_from=str(tmp_path / "iar")), "holds"),
        (
            dict(method="iar", clusters=files["bal"], rearrange=False, init_from=str(tmp_path / "iar")),
            "rearranged ids",
        ),
    ]
    for kw, words in cases:
        with pytest.raises(ClusterarError, match=words):
            train(TrainConfig(**common, **kw), tmp_path / "run", progress=False)
        assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_llamagen_checkpoint_converts_to_iar_with_the_same_samples(files, tmp_path):
    pt = tmp_path / "c2i_tiny.pt"
    export_llamagen(_random_model(3), pt)
    args = ["--tokenizer", files["tok"], "--clusters", files["bal"], "--grid-size", str(GRID)]
    assert main(["convert", str(pt), "--method", "iar", "--out", str(tmp_path / "iar"), *args]) == 0
    meta = read_model_info(tmp_path / "iar" / "model.safetensors")
    assert meta.tokenizer == str(Path(files["tok"]).resolve()) and meta.init_epoch == 0.0
    original = Pipeline.load(pt, tokenizer=files["tok"], grid_size=GRID)
    converted = Pipeline.load(tmp_path / "iar")
    y = torch.arange(CLASSES)
    assert torch.equal(original.sample(y, seed=1, cfg_scale=2.0), converted.sample(y, seed=1, cfg_scale=2.0))
