"""Trainer: the four methods learn, IAR's loss, CTF refiner masking, exact resume, grad accumulation,
DDP/FSDP equivalence, divergence handling, bad input, the run-folder contract and the CLI."""

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
from clusterar.fileio import load_tensors, read_meta
from clusterar.methods import Method, restrict_logits
from clusterar.model_file import load_model, read_model_info
from clusterar.tokenizer import VQConfig, VQModel, save_tokenizer
from clusterar.tokens import write_token_file
from clusterar.train import TrainConfig, epoch_permutation, lr_at, train
from clusterar.train.divergence import DivergenceWatch
from clusterar.train.parallel import Parallel

K, M, GRID, CLASSES = 64, 8, 4, 4  # 64 codes in 8 clusters, 4x4 token grids, 4 classes


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded_tokenizer(seed: int) -> VQModel:
    torch.manual_seed(seed)
    cfg = VQConfig(
        ch=32,
        ch_mult=(1, 2),
        z_channels=32,
        codebook_size=K,
        codebook_dim=4,
        enc_res_blocks=1,
        dec_res_blocks=1,
    )
    return VQModel(cfg).eval()


def token_file(path: Path, tok: VQModel, codes: np.ndarray, labels: np.ndarray) -> str:
    meta = {
        "tokenizer_fingerprint": tok.fingerprint(),
        "codebook_fingerprint": tok.codebook_fingerprint(),
        "codebook_size": K,
        "grid": [GRID, GRID],
        "image_size": 2 * GRID,
        "views": ["original", "hflip"][: codes.shape[1]],
        "dataset": "random",
        "split": "train",
        "num_classes": CLASSES,
        "class_names": [f"c{i}" for i in range(CLASSES)],
        "permutation": None,
    }
    write_token_file(path, codes.astype(np.uint8), labels, meta)
    return str(path)


def tokenizers_and_clusters(d: Path, other_clusters: str) -> tuple[VQModel, CodebookClusters]:
    """Into folder d: tok.safetensors and other.safetensors (two seeded tokenizers), bal.safetensors and
    km.safetensors (balanced and k-means clusters of tok's codebook), other-bal/other-km.safetensors
    (`other_clusters` clusters of the other tokenizer's). Returns tok and its k-means clusters."""
    tok, other = seeded_tokenizer(0), seeded_tokenizer(1)
    save_tokenizer(tok, d / "tok.safetensors")
    save_tokenizer(other, d / "other.safetensors")
    w = tok.quantize.embedding.weight.detach()
    km = CodebookClusters.fit(w, "kmeans", M)
    CodebookClusters.fit(w, "balanced", M).save(d / "bal.safetensors")
    km.save(d / "km.safetensors")
    suffix = "bal" if other_clusters == "balanced" else "km"
    CodebookClusters.fit(other.quantize.embedding.weight.detach(), other_clusters, M).save(
        d / f"other-{suffix}.safetensors"
    )
    return tok, km


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("train-data")
    tok, km = tokenizers_and_clusters(d, other_clusters="balanced")
    assert not km.is_balanced  # the segment cluster loss and CTF must cope with unequal sizes
    rng = np.random.default_rng(0)
    # 64 images, two views, random tokens
    token_file(
        d / "rand.safetensors", tok, rng.integers(0, K, (64, 2, GRID * GRID)), rng.integers(0, CLASSES, 64)
    )
    # 8 images, one view: a batch to overfit
    token_file(d / "few.safetensors", tok, rng.integers(0, K, (8, 1, GRID * GRID)), np.arange(8) % CLASSES)
    # fine token = a fixed member of its k-means cluster: the refiner can reach 100%
    fine_of = np.array([int(np.flatnonzero(km.labels.numpy() == c)[0]) for c in range(M)])
    coarse = rng.integers(0, M, (64, 2, GRID * GRID))
    token_file(d / "ctf.safetensors", tok, fine_of[coarse], rng.integers(0, CLASSES, 64))
    # encoded by another tokenizer
    token_file(
        d / "other-tokens.safetensors",
        seeded_tokenizer(1),
        rng.integers(0, K, (16, 1, GRID * GRID)),
        np.zeros(16),
    )
    return {
        "tok": str(d / "tok.safetensors"),
        "other": str(d / "other.safetensors"),
        "bal": str(d / "bal.safetensors"),
        "km": str(d / "km.safetensors"),
        "other_bal": str(d / "other-bal.safetensors"),
        "rand": str(d / "rand.safetensors"),
        "few": str(d / "few.safetensors"),
        "ctf": str(d / "ctf.safetensors"),
        "other_tokens": str(d / "other-tokens.safetensors"),
    }


def cfg(files, data: str = "rand", **kw) -> TrainConfig:
    base = dict(tokens=files[data], tokenizer=files["tok"], model="tiny", batch_size=8, steps=4, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def no_time(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")}


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("method", ["baseline", "iar"])
def test_tiny_model_overfits_a_tiny_batch(files, tmp_path, method):
    clusters = files["bal"] if method == "iar" else None
    c = cfg(files, "few", method=method, clusters=clusters, steps=80, lr=3e-3, dropout=0.0, class_dropout=0.0)
    out = train(c, tmp_path / "run", progress=False)
    first, last = records(tmp_path / "run")[0], records(tmp_path / "run")[-1]
    tce = "token_ce" if method == "iar" else "loss"
    assert first[tce] == pytest.approx(math.log(K), abs=1e-3)  # zero-initialised head: uniform
    assert last[tce] < 0.1 * math.log(K), last
    assert out["finished"] and out["step"] == 80 and out["acc_token"] > 0.9


def test_iar_loss_is_token_ce_plus_cluster_ce(files):
    bal, km = CodebookClusters.load(files["bal"]), CodebookClusters.load(files["km"])
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (3, GRID * GRID), generator=g)
    for clusters, rearrange in ((bal, True), (bal, False), (km, False)):
        m = Method("iar", K, clusters, cluster_weight=0.7, rearrange=rearrange)
        inputs, targets, _ = m.prepare(codes)
        assert torch.equal(targets, clusters.perm[codes] if rearrange else codes)
        assert torch.equal(inputs, targets[:, :-1])
        logits = torch.randn(3, GRID * GRID, K, generator=g) * 3
        p = logits.softmax(-1)
        labels = clusters.new_labels if rearrange else clusters.labels  # cluster of each model id
        tce = -p.gather(-1, targets[..., None]).log().mean()
        same = labels[None, None, :] == labels[targets][..., None]
        cce = -(p * same).sum(-1).log().mean()
        got = m.loss(logits, targets, None)
        torch.testing.assert_close(got["token_ce"], tce)
        torch.testing.assert_close(got["cluster_ce"], cce)
        torch.testing.assert_close(got["loss"], tce + 0.7 * cce)
        # the cluster accuracy scores the cluster holding the most probability mass
        mass = torch.zeros(3, GRID * GRID, M).index_add_(-1, labels, p)
        want = (mass.argmax(-1) == labels[targets]).float().mean()
        torch.testing.assert_close(m.metrics(logits, targets, None)["acc_cluster"], want)


def test_iar_first_loss_in_the_trainer(files, tmp_path):
    """The zero-initialised head predicts uniformly: token CE = ln K, balanced cluster CE = ln M."""
    train(cfg(files, method="iar", clusters=files["bal"], steps=1), tmp_path / "run", progress=False)
    r = records(tmp_path / "run")[0]
    assert r["token_ce"] == pytest.approx(math.log(K), abs=1e-4)
    assert r["cluster_ce"] == pytest.approx(math.log(M), abs=1e-4)
    assert r["loss"] == pytest.approx(math.log(K) + math.log(M), abs=1e-4)


@pytest.mark.parametrize("restrict", [False, True])
def test_refiner_learns_a_deterministic_coarse_to_fine_map(files, tmp_path, restrict):
    c = cfg(
        files,
        "ctf",
        method="ctf-refiner",
        clusters=files["km"],
        restrict_to_cluster=restrict,
        steps=60,
        lr=3e-3,
        dropout=0.0,
        class_dropout=0.0,
        log_every=20,
    )
    out = train(c, tmp_path / "run", progress=False)
    assert out["acc_token"] == 1.0 and out["acc_cluster"] == 1.0 and out["loss"] < 0.05
    model, info = load_model(tmp_path / "run" / "model.safetensors")
    assert info.restrict_to_cluster is restrict and info.id_space == "original"
    cfgd = model.config
    assert (cfgd.vocab_size, cfgd.input_vocab_size, cfgd.causal) == (K, M, False)
    # the saved model, given the true coarse labels, predicts every fine token
    codes = load_tensors(files["ctf"])[0]["codes"][:16, 0].long()
    km = CodebookClusters.load(files["km"])
    coarse = km.labels[codes]
    with torch.no_grad():
        logits = model(coarse, torch.zeros(16, dtype=torch.long))
    if restrict:
        logits = restrict_logits(logits, coarse, km.labels)
    assert torch.equal(logits.argmax(-1), codes)


def test_restrict_to_cluster_masks_logits_outside_the_cluster(files):
    km = CodebookClusters.load(files["km"])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, K, generator=g)
    coarse = torch.randint(0, M, (2, 5), generator=g)
    out = restrict_logits(logits, coarse, km.labels)
    inside = km.labels[None, None, :] == coarse[..., None]
    assert torch.equal(out[inside], logits[inside])
    assert bool(torch.isneginf(out[~inside]).all())
    # the refiner's loss is then the CE over the cluster's members only
    m = Method("ctf-refiner", K, km, restrict_to_cluster=True)
    fine = torch.stack(
        [torch.multinomial(inside[i, j].float(), 1, generator=g)[0] for i in range(2) for j in range(5)]
    )
    fine = fine.view(2, 5)
    want = -torch.stack(
        [
            logits[i, j][inside[i, j]].log_softmax(-1)[int(inside[i, j][: fine[i, j]].sum())]
            for i in range(2)
            for j in range(5)
        ]
    ).mean()
    torch.testing.assert_close(m.loss(logits, fine, coarse)["loss"], want)


def test_ctf_coarse_predicts_cluster_labels(files, tmp_path):
    out = train(
        cfg(files, method="ctf-coarse", clusters=files["km"], steps=2), tmp_path / "run", progress=False
    )
    r = records(tmp_path / "run")[0]
    assert r["loss"] == pytest.approx(math.log(M), abs=1e-4) and "acc_token" not in r and "acc_cluster" in r
    model, info = load_model(tmp_path / "run" / "model.safetensors")
    assert (model.config.vocab_size, model.config.input_vocab_size, model.config.causal) == (M, M, True)
    assert info.id_space == "coarse" and out["step"] == 2


# ----------------------------------------------------------------------------- determinism


def test_grad_accumulation_equals_one_big_batch(files, tmp_path):
    kw = dict(steps=3, dropout=0.0, class_dropout=0.0, lr=1e-3, method="iar", clusters=files["bal"])
    train(cfg(files, batch_size=4, grad_accum=2, **kw), tmp_path / "acc", progress=False)
    train(cfg(files, batch_size=8, grad_accum=1, **kw), tmp_path / "big", progress=False)
    a, _ = load_tensors(tmp_path / "acc" / "checkpoint.safetensors")
    b, _ = load_tensors(tmp_path / "big" / "checkpoint.safetensors")
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la, lb = records(tmp_path / "acc"), records(tmp_path / "big")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-5)


def test_resume_is_bit_exact(files, tmp_path):
    kw = dict(
        method="iar",
        clusters=files["bal"],
        batch_size=4,
        grad_accum=2,
        ema=0.9,
        schedule="cosine",
        warmup=1,
        lr=1e-3,
        steps=12,  # 1.5 epochs of 8 steps: the resumed session crosses an epoch boundary
        ckpt_every=5,
    )
    straight = tmp_path / "straight"
    train(cfg(files, **kw), straight, progress=False)
    parted = tmp_path / "parted"
    part = train(cfg(files, **kw), parted, stop_at=7, progress=False)
    assert not part["finished"] and read_meta(parted / "checkpoint.safetensors")["step"] == 7
    with pytest.raises(ClusterarError, match="--resume"):
        train(cfg(files, **kw), parted, progress=False)
    with pytest.raises(ClusterarError, match="settings differ"):
        train(cfg(files, **{**kw, "lr": 2e-3}), parted, resume=True, progress=False)
    train(cfg(files, **kw), parted, resume=True, progress=False)
    a, ma = load_tensors(straight / "checkpoint.safetensors")
    b, mb = load_tensors(parted / "checkpoint.safetensors")
    assert sorted(a) == sorted(b) and any(k.startswith("extra.ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert ma["step"] == mb["step"] == 12
    assert [no_time(r) for r in records(straight)] == [no_time(r) for r in records(parted)]
    # the model file holds the EMA weights
    ema = {k[len("extra.ema.") :]: v for k, v in a.items() if k.startswith("extra.ema.")}
    model, _ = load_model(straight / "model.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_schedule_and_data_order():
    c = TrainConfig(tokens="t", tokenizer="t", steps=10, lr=1e-3, min_lr=1e-4, schedule="cosine", warmup=2)
    lrs = [lr_at(s, c, 10) for s in range(10)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 1e-4
    assert lr_at(10, c, 10) == pytest.approx(1e-4)
    assert torch.equal(epoch_permutation(50, 0, 3), epoch_permutation(50, 0, 3))
    assert not torch.equal(epoch_permutation(50, 0, 3), epoch_permutation(50, 0, 4))
    assert sorted(epoch_permutation(50, 1, 0).tolist()) == list(range(50))


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_follow_one_process(files, tmp_path, fsdp, torchrun):
    """2 gloo processes x batch 4 == 1 process x batch 8 (DDP; FSDP2 shards on CPU too, and its run is
    stopped after 2 steps and resumed: sharded state goes through the single-file checkpoint)."""
    common = ["--tokens", files["rand"], "--tokenizer", files["tok"], "--model", "tiny", "--method", "iar"]
    common += [
        "--clusters",
        files["bal"],
        "--steps",
        "4",
        "--log-every",
        "1",
        "--no-progress",
        "--ema",
        "0.9",
    ]
    common += ["--dropout", "0", "--class-dropout", "0", "--lr", "1e-3"]
    assert main(["train", *common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    two = [*common, "--batch-size", "4", "--out", str(tmp_path / "two")]
    sessions = [[*two, "--fsdp", "--stop-at", "2"], [*two, "--fsdp", "--resume"]] if fsdp else [two]
    for args in sessions:
        res = torchrun(args, tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("loss", "token_ce", "cluster_ce", "acc_token", "acc_cluster", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=2e-5), key
    a, _ = load_model(tmp_path / "one" / "model.safetensors")
    b, info = load_model(tmp_path / "two" / "model.safetensors")
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)
    assert read_meta(tmp_path / "two" / "checkpoint.safetensors")["world_size"] == 2
    assert info.step == 4


# ----------------------------------------------------------------------------- failures


def test_divergence_stops_and_keeps_the_last_good_checkpoint(files, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ClusterarError, match="diverged") as e:
        train(cfg(files, lr=1e30, steps=20, ckpt_every=1), run, progress=False)
    assert "last good checkpoint" in str(e.value)
    step = read_meta(run / "checkpoint.safetensors")["step"]
    assert 1 <= step < 20
    tensors, _ = load_tensors(run / "checkpoint.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    assert read_model_info(run / "model.safetensors").step == step


def test_divergence_watch_skips_updates_on_the_device():
    """With the fused AdamW, the first non-finite step and every later one leave the weights alone (no host
    read in between); the check names that step and its values. An unfused optimizer must look at once."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    watch = DivergenceWatch(opt, ["loss", "grad_norm"], torch.device("cpu"), step0=10)
    assert not watch.must_check_now
    after = []
    for values in ([1.0, 2.0], [float("nan"), 3.0], [1.0, 1.0]):
        w.grad = torch.ones(3)
        watch.see(torch.tensor(values))
        opt.step()
        after.append(w.detach().clone())
    assert not torch.equal(after[0], torch.ones(3))  # the good step updated
    assert torch.equal(after[1], after[0]) and torch.equal(after[2], after[0])  # later ones did not
    with pytest.raises(ClusterarError, match=r"optimizer step 12 \(lr 0.5\): loss nan, grad_norm 3;"):
        watch.check(lambda step: step / 22, "kept")
    assert DivergenceWatch(torch.optim.AdamW([w]), ["loss"], torch.device("cpu")).must_check_now


def test_divergence_found_late_names_the_same_step(files, tmp_path, monkeypatch):
    """A trainer whose optimizer skips non-finite steps on the device (the fused AdamW, CUDA's; forced here
    on the CPU) reads the flag only at log steps and saves, yet names the step that diverged, as the
    per-step check does, and writes no checkpoint after it."""
    kw = dict(lr=1e30, steps=20, ckpt_every=1000)
    with pytest.raises(ClusterarError, match="diverged") as per_step:
        train(cfg(files, log_every=1, **kw), tmp_path / "a", progress=False)
    monkeypatch.setattr(Parallel, "fused_optimizer", property(lambda self: True))
    with pytest.raises(ClusterarError, match="diverged") as late:
        train(cfg(files, log_every=7, **kw), tmp_path / "b", progress=False)
    step = int(str(per_step.value).split("optimizer step ")[1].split()[0])
    assert f"optimizer step {step} " in str(late.value) and step < 7
    assert "not updated from then on" in str(late.value)
    assert not (tmp_path / "b" / "checkpoint.safetensors").exists()
    assert [r["step"] for r in records(tmp_path / "b")] == []  # step 7 found it: nothing was logged


def test_bad_input_is_a_clear_error(files, tmp_path):
    cases = [
        (dict(method="diffusion"), "unknown --method"),
        (dict(model="GPT-Z"), "unknown --model"),
        (dict(method="iar"), "needs --clusters"),
        (dict(method="ctf-refiner"), "needs --clusters"),
        (dict(method="iar", clusters=files["km"]), "equal-size clusters"),
        (dict(method="iar", clusters=files["other_bal"]), "fingerprint"),
        (dict(tokens=files["other_tokens"]), "encoded by tokenizer"),
        (dict(tokenizer=files["other"], clusters=files["bal"]), "encoded by tokenizer"),
        (dict(method="iar", clusters=files["bal"], restrict_to_cluster=True), "only applies to"),
        (dict(epochs=1.0), "exactly one of --epochs or --steps"),
        (dict(batch_size=100), "larger than the 64 images"),
        (dict(schedule="linear"), "unknown --schedule"),
        (dict(fsdp=True), "torchrun"),
        (dict(tokens=str(tmp_path / "missing.safetensors")), "not found"),
    ]
    for kw, match in cases:
        with pytest.raises(ClusterarError, match=match):
            train(cfg(files, **kw), tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------- run folder and CLI


def test_cli_run_folder_contract(files, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--tokens",
        files["rand"],
        "--tokenizer",
        files["tok"],
        "--model",
        "tiny",
        "--no-progress",
    ]
    args += ["--method", "iar", "--clusters", files["bal"], "--epochs", "1", "--batch-size", "8"]
    args += ["--snapshot-every", "0.5", "--log-every", "2", "--out", str(run)]
    assert main(args) == 0
    assert "model written to" in capsys.readouterr().out
    names = sorted(p.name for p in run.iterdir())
    assert names == [
        "checkpoint.safetensors",
        "config.json",
        "curves.png",
        "log.jsonl",
        "model.safetensors",
        "snapshots",
    ]
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["model-step0000004.safetensors", "model-step0000008.safetensors"]
    info = read_model_info(run / "model.safetensors")
    bal = CodebookClusters.load(files["bal"])
    tok_fp = read_meta(files["tok"])["fingerprint"]
    assert info.method == "iar" and info.id_space == "rearranged" and info.restrict_to_cluster is False
    assert info.tokenizer == str(Path(files["tok"]).resolve()) and info.tokenizer_fingerprint == tok_fp
    assert (
        info.clusters == str(Path(files["bal"]).resolve()) and info.clusters_fingerprint == bal.fingerprint()
    )
    assert (info.step, info.epoch, info.grid, info.num_classes) == (8, 1.0, [GRID, GRID], CLASSES)
    assert info.image_size == 2 * GRID and info.dataset == "random" and len(info.class_names) == CLASSES
    assert read_model_info(run / "snapshots" / "model-step0000004.safetensors").epoch == 0.5
    assert [r["step"] for r in records(run)] == [2, 4, 6, 8]
    assert json.loads((run / "config.json").read_text())["total_steps"] == 8
    # baseline with clusters: logged for comparison, ids stay original
    assert main(args[:-1] + [str(tmp_path / "base"), "--method", "baseline"]) == 0
    assert read_model_info(tmp_path / "base" / "model.safetensors").id_space == "original"
    assert "acc_cluster" in records(tmp_path / "base")[-1]
    # errors: one line, exit status 2
    assert main(args[:-1] + [str(tmp_path / "bad"), "--method", "iar", "--clusters", files["km"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: IAR's rearranged ids need equal-size clusters") and "Traceback" not in err


def test_validate_scores_a_model_file_like_training(files, tmp_path):
    """validation_loss() = the training loss and accuracies of view 0 in eval mode, computed independently here."""
    from clusterar.losses import cluster_accuracy, iar_loss, token_accuracy
    from clusterar.tokens import TokenFile
    from clusterar.train import validation_loss

    train(
        cfg(files, "few", method="iar", clusters=files["bal"], steps=20, lr=3e-3),
        tmp_path / "r",
        progress=False,
    )
    got = validation_loss(
        tmp_path / "r" / "model.safetensors", files["few"], batch_size=3
    )  # 3 + 3 + 2 images
    model, _ = load_model(tmp_path / "r" / "model.safetensors")
    cl = CodebookClusters.load(files["bal"])
    codes, labels = TokenFile.open(files["few"]).batch(np.arange(8))
    ids = cl.perm[codes]
    with torch.no_grad():
        logits = model(ids[:, :-1], labels)
    want = iar_loss(logits, ids, cl.block_size, 1.0)
    assert got["loss"] == pytest.approx(float(want["loss"]), rel=1e-5)
    assert got["cluster_ce"] == pytest.approx(float(want["cluster_ce"]), rel=1e-5)
    assert got["acc_token"] == pytest.approx(float(token_accuracy(logits, ids)), abs=1e-6)
    assert got["acc_cluster"] == pytest.approx(float(cluster_accuracy(logits, ids, cl.block_size)), abs=1e-6)
    with pytest.raises(ClusterarError, match="another tokenizer"):
        validation_loss(tmp_path / "r" / "model.safetensors", files["other_tokens"])


# ----------------------------------------------------------------------------- resuming, said aloud


def test_resume_says_where_it_continues_and_extends_a_finished_run(files, tmp_path, capsys):
    """--resume names the step it continues from; a finished run takes a larger budget, and with the
    constant schedule the extended run equals one trained for the larger budget from the start."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    train(cfg(files, steps=6, ckpt_every=2), straight, progress=False)
    train(cfg(files, steps=4, ckpt_every=2), extended, progress=False)
    capsys.readouterr()
    train(cfg(files, steps=6, ckpt_every=2), extended, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"resuming {extended} at step 4 of 6 (the budget was 4 steps)" in err
    assert "stretched" not in err  # constant schedule without warmup: nothing changes
    assert [no_time(r) for r in records(straight)] == [no_time(r) for r in records(extended)]
    a, _ = load_model(straight / "model.safetensors")
    b, info = load_model(extended / "model.safetensors")
    assert info.step == 6
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    # cosine: the rest of the schedule changes, and the message says so
    cos = tmp_path / "cos"
    train(cfg(files, steps=4, schedule="cosine"), cos, progress=False)
    capsys.readouterr()
    train(cfg(files, steps=6, schedule="cosine"), cos, resume=True, progress=False)
    assert "schedule is stretched" in capsys.readouterr().err
    # a budget below the step already reached is refused, naming the flag
    with pytest.raises(ClusterarError, match="already at step 6; give a larger --steps"):
        train(cfg(files, steps=3), extended, resume=True, progress=False)


def test_resume_in_an_empty_folder_says_it_starts_a_new_run(files, tmp_path, capsys):
    train(cfg(files, steps=2), tmp_path / "new", resume=True, progress=False)
    assert "holds no checkpoint yet; starting a new run" in capsys.readouterr().err
    assert read_model_info(tmp_path / "new" / "model.safetensors").step == 2


def test_a_folder_of_another_kind_of_run_is_refused_and_left_alone(files, tmp_path):
    """Training into a tokenizer's run folder names what the folder holds and does not advise deleting it
    (that would delete a tokenizer); the tokenizer trainer answers the same of a transformer run."""
    from clusterar.fileio import save_tensors
    from clusterar.train.tokenizer import CHECKPOINT_KIND as TOKENIZER_CHECKPOINT
    from clusterar.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    tok_run = tmp_path / "tok"
    tok_run.mkdir()
    save_tensors(tok_run / "checkpoint.safetensors", {"x": torch.zeros(1)}, {"kind": TOKENIZER_CHECKPOINT})
    before = (tok_run / "checkpoint.safetensors").read_bytes()
    for resume in (False, True):
        with pytest.raises(ClusterarError) as e:
            train(cfg(files), tok_run, resume=resume, progress=False)
        msg = str(e.value)
        assert f"{tok_run} holds another kind of run (checkpoint.safetensors is a tokenizer training" in msg
        assert "not a training run; choose another --out" in msg and "delete" not in msg
    assert sorted(p.name for p in tok_run.iterdir()) == ["checkpoint.safetensors"]
    assert (tok_run / "checkpoint.safetensors").read_bytes() == before

    train(cfg(files), tmp_path / "gpt", progress=False)
    tok_cfg = TokenizerTrainConfig(data="digits", preset="tiny", image_size=16, codebook_size=64, steps=2)
    with pytest.raises(
        ClusterarError, match="holds another kind of run .* not a tokenizer run; choose another"
    ):
        train_tokenizer(tok_cfg, tmp_path / "gpt", progress=False)
