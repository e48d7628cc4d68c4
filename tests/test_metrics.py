"""Metrics: Frechet distance, Inception Score, precision/recall, the digit classifier and its cache,
reference statistics, image sources (npz, folder), the Inception route's errors, and `clusterar evaluate`."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from clusterar import ClusterarError
from clusterar import classifier as clf
from clusterar.cli import main
from clusterar.data import load_dataset
from clusterar.metrics import (
    ArraySource,
    ClassifierExtractor,
    FolderSource,
    Inception,
    NpzSource,
    class_accuracy,
    evaluate_images,
    feature_statistics,
    format_table,
    frechet_distance,
    inception_score,
    make_extractor,
    manifold_radii,
    open_images,
    precision_recall,
    reference_statistics,
)

SHORT = dict(epochs=3, width=8, lr=0.01)  # a ~1 s classifier for the cache tests


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One cache folder for the module, also as $CLUSTERAR_CACHE: nothing is written to ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLUSTERAR_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def digits_ext(cache):
    """The default digits classifier (trained once here, ~8 s on one thread), shared by the tests below."""
    return ClassifierExtractor("digits", cache, device="cpu", progress=False)


@pytest.fixture(scope="module")
def digits_train_nhwc():
    """180 random digits TRAIN images as the sampler writes them: uint8 [N, 32, 32, 3]."""
    images = load_dataset("digits", "train").images
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:180]
    return images[idx].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def scipy_fid(mu1, s1, mu2, s2):
    """The pytorch-fid / ADM formula with scipy.linalg.sqrtm, written out directly."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_matches_scipy_on_random_covariances():
    rng = np.random.default_rng(0)
    for d in (1, 5, 40):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9 * np.trace(s1))


def test_frechet_distance_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances): finite, real, and equal to scipy's."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 30)), rng.normal(size=(12, 30)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    assert np.linalg.matrix_rank(s1) < 30
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_gaussians_with_known_answer():
    """Diagonal covariances: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
    expect = 9.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-12)


def test_frechet_distance_rejects_mismatched_or_broken_statistics():
    with pytest.raises(ClusterarError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ClusterarError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_known_values():
    c = 10
    confident = np.eye(c)[np.arange(200) % c]  # one-hot, every class equally often
    assert inception_score(confident)[0] == pytest.approx(c, rel=1e-12)
    mean, std = inception_score(confident, splits=4)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    assert inception_score(np.eye(c)[np.zeros(50, int)])[0] == pytest.approx(1.0)  # a single class
    assert inception_score(np.full((50, c), 1.0 / c))[0] == pytest.approx(1.0)  # no confidence
    half = np.eye(4)[np.arange(100) % 2]  # confident, two of four classes used
    assert inception_score(torch.from_numpy(half))[0] == pytest.approx(2.0)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(ClusterarError, match="summing to 1"):
        inception_score(np.ones((5, 3)))
    with pytest.raises(ClusterarError, match="splits"):
        inception_score(np.eye(3), splits=4)


# ----------------------------------------------------------------------------- precision / recall


def brute_force_pr(real, fake, k):
    """The definition, in float64 numpy: k-th neighbour radii (self excluded), any-ball membership."""

    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(d2(real, real), axis=1)[:, k]
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    dfr = d2(fake, real)
    return (dfr <= r_real[None]).any(1).mean(), (dfr <= r_fake[:, None]).any(0).mean()


def test_precision_recall_toy_distributions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8)).astype(np.float32)
    b = (rng.normal(size=(40, 8)) + 100).astype(np.float32)
    assert precision_recall(a, a, k=3) == (1.0, 1.0)  # identical sets
    assert precision_recall(a, b, k=3) == (0.0, 0.0)  # disjoint, far apart
    real = np.concatenate([a, b])
    precision, recall = precision_recall(real, a, k=3)  # samples cover one of two modes
    assert precision == 1.0 and recall == pytest.approx(60 / 100)


def test_precision_recall_blocked_equals_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(70, 5)).astype(np.float32)
    fake = (rng.normal(size=(50, 5)) * 1.3 + 0.4).astype(np.float32)
    expect = brute_force_pr(real.astype(np.float64), fake.astype(np.float64), 3)
    for block in (7, 16, 4096):  # blocks smaller than the sets exercise the running top-k and OR
        assert precision_recall(real, fake, k=3, block=block) == pytest.approx(expect)
    assert 0 < expect[0] < 1 and 0 < expect[1] < 1
    radii = manifold_radii(torch.from_numpy(real), k=3, block=9).double().numpy()
    d2 = ((real[:, None].astype(np.float64) - real[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(d2, 1)[:, 3], rtol=1e-4)
    with pytest.raises(ClusterarError, match="k"):
        precision_recall(real[:3], fake, k=3)


# ----------------------------------------------------------------------------- classifier and its cache


def test_classifier_cache_miss_hit_retrain(tmp_path, monkeypatch, caplog):
    model, meta = clf.load_classifier("digits", tmp_path, progress=False, **SHORT)
    path = clf.classifier_path(clf.ClassifierConfig(dataset="digits", **SHORT), tmp_path)
    assert path.is_file() and meta["config"]["epochs"] == 3 and 0.5 < meta["val_accuracy"] <= 1
    assert meta["n_train"] == len(load_dataset("digits", "train"))
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def no_training(*a, **k):
        raise AssertionError("a cache hit must not train")

    with monkeypatch.context() as m:  # hit: loaded, verified, no training
        m.setattr(clf, "train_classifier", no_training)
        model2, meta2 = clf.load_classifier("digits", tmp_path, progress=False, **SHORT)
    assert meta2 == meta
    assert all(torch.equal(weights[k], v) for k, v in model2.state_dict().items())

    other = clf.classifier_path(clf.ClassifierConfig(dataset="digits", **{**SHORT, "seed": 1}), tmp_path)
    assert other != path  # every setting is part of the fingerprint

    raw = bytearray(path.read_bytes())  # corrupt one weight byte: the hash check catches it
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="clusterar.classifier"):
        model3, meta3 = clf.load_classifier("digits", tmp_path, progress=False, **SHORT)
    assert "training it again" in caplog.text and "corrupt" in caplog.text
    # retrained from the same seed: bit-identical weights (training is deterministic)
    assert all(torch.equal(weights[k], v) for k, v in model3.state_dict().items())
    assert meta3["weights_fingerprint"] == meta["weights_fingerprint"]


def test_classifier_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERAR_CACHE", str(tmp_path / "env"))
    assert clf.cache_dir() == tmp_path / "env"
    assert clf.cache_dir(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(ClusterarError, match="no classifier"):
        clf.load_classifier("cifar", tmp_path)
    with pytest.raises(ClusterarError, match="unknown classifier setting"):
        clf.load_classifier("digits", tmp_path, depth=3)


def test_image_layouts_give_identical_classifier_inputs(digits_train_nhwc):
    nhwc = digits_train_nhwc[:8]
    grey = torch.from_numpy(nhwc[..., 0])
    views = [nhwc, torch.from_numpy(nhwc).permute(0, 3, 1, 2), grey[:, None], grey]
    inputs = [clf.to_classifier_input(clf.to_nchw_uint8(v)) for v in views]
    for x in inputs[1:]:
        assert torch.equal(x, inputs[0])
    assert inputs[0].shape == (8, 1, 32, 32) and inputs[0].min() >= -1 and inputs[0].max() <= 1
    big = torch.from_numpy(nhwc).permute(0, 3, 1, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert clf.to_classifier_input(big).shape == (8, 1, 32, 32)  # other sizes are resized to 32


def test_digits_classifier_is_accurate(digits_ext):
    val = load_dataset("digits", "val")
    assert digits_ext.meta["val_accuracy"] == clf.accuracy(digits_ext.model, val.images, val.labels)
    assert digits_ext.meta["val_accuracy"] >= 0.97


# ----------------------------------------------------------------------------- evaluation


def test_fid_train_vs_val_small_noise_large(digits_ext, digits_train_nhwc, cache):
    real = evaluate_images(digits_train_nhwc, "digits:val", digits_ext, cache=cache, progress=False)
    noise_imgs = np.random.default_rng(0).integers(0, 256, digits_train_nhwc.shape, dtype=np.uint8)
    noise = evaluate_images(noise_imgs, "digits:val", digits_ext, cache=cache, progress=False)
    assert real["n_samples"] == 180 and real["n_reference"] == len(load_dataset("digits", "val"))
    assert real["reference"] == "digits:val" and real["extractor"] == "classifier:digits"
    assert noise["fid"] > 20 * real["fid"] and real["fid"] < 5
    assert real["inception_score"] > 8 and noise["inception_score"] < 2
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    assert noise["precision"] == 0 and noise["recall"] == 0


def test_fid_of_a_set_with_itself_is_zero(digits_ext, digits_train_nhwc):
    m = evaluate_images(digits_train_nhwc, digits_train_nhwc, digits_ext, progress=False)
    assert m["fid"] == pytest.approx(0, abs=1e-6)
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_default_extractor_and_reference_cache(digits_ext, cache, tmp_path, monkeypatch, caplog):
    ext = make_extractor(None, open_images("digits:val"), cache, "cpu", progress=False)
    assert ext.fingerprint == digits_ext.fingerprint  # the cached classifier of the bundled reference
    first = reference_statistics("digits:val", ext, tmp_path, progress=False)
    (stats_file,) = tmp_path.glob("refstats-*.safetensors")
    with monkeypatch.context() as m:
        m.setattr(ext, "extract", lambda *a, **k: pytest.fail("reference statistics not cached"))
        again = reference_statistics("digits:val", ext, tmp_path, progress=False)
    np.testing.assert_array_equal(first.sigma, again.sigma)
    np.testing.assert_array_equal(first.features, again.features)
    stats_file.write_bytes(stats_file.read_bytes()[:100])  # truncated: recomputed, not an error
    with caplog.at_level(logging.WARNING, logger="clusterar.metrics"):
        fixed = reference_statistics("digits:val", ext, tmp_path, progress=False)
    assert "recomputing" in caplog.text
    np.testing.assert_array_equal(first.features, fixed.features)
    with pytest.raises(ClusterarError, match="choose a feature extractor"):
        make_extractor(None, ArraySource(np.zeros((4, 8, 8, 3), np.uint8)))
    with pytest.raises(ClusterarError, match="unknown extractor"):
        make_extractor("vgg", open_images("digits:val"))


def test_npz_and_folder_sources_match_the_array(digits_ext, digits_train_nhwc, tmp_path):
    x = digits_train_nhwc[:40]
    np.savez(tmp_path / "s.npz", x)
    np.savez_compressed(tmp_path / "c.npz", arr_0=x, arr_1=np.arange(40))
    for name in ("s.npz", "c.npz"):
        src = open_images(tmp_path / name)
        assert isinstance(src, NpzSource) and len(src) == 40
        got = torch.cat(list(src.batches(16)))  # 16 + 16 + 8: reads across batch ends
        assert torch.equal(got, torch.from_numpy(x).permute(0, 3, 1, 2))
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    src = open_images(str(folder))
    assert isinstance(src, FolderSource) and len(src) == 40
    a = evaluate_images(tmp_path / "s.npz", "digits:val", digits_ext, progress=False)
    b = evaluate_images(folder, "digits:val", digits_ext, progress=False)
    # PNG is lossless: the same images give the same numbers
    for key in ("fid", "inception_score", "precision", "recall"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "odd.png")
    with pytest.raises(ClusterarError, match="--image-size"):
        evaluate_images(folder, "digits:val", digits_ext, progress=False)
    c = evaluate_images(folder, "digits:val", digits_ext, progress=False, image_size=32)
    assert c["n_samples"] == 41


def test_adm_reference_npz_stored_statistics(digits_ext, digits_train_nhwc, tmp_path):
    """An ADM-style reference (arr_0 + mu/sigma): FID from the stored statistics, PR from the images."""
    ref_imgs = load_dataset("digits", "val").images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    feats, _ = digits_ext.extract(ArraySource(ref_imgs), progress=False)
    mu, sigma = feature_statistics(feats)
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs, mu=mu + 1.0, sigma=sigma)  # shifted: visible in FID
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    plain = evaluate_images(digits_train_nhwc, "digits:val", digits_ext, progress=False)
    adm = evaluate_images(digits_train_nhwc, tmp_path / "ref.npz", digits_ext, progress=False)
    assert adm["reference_stats"] == "npz mu/sigma" and adm["n_reference"] == len(ref_imgs)
    assert adm["precision"] == pytest.approx(plain["precision"])
    assert adm["recall"] == pytest.approx(plain["recall"])
    mu_s, sigma_s = feature_statistics(digits_ext.extract(ArraySource(digits_train_nhwc), progress=False)[0])
    assert adm["fid"] == pytest.approx(frechet_distance(mu_s, sigma_s, mu + 1.0, sigma), rel=1e-9)
    stats_only = evaluate_images(digits_train_nhwc, tmp_path / "stats.npz", digits_ext, progress=False)
    assert stats_only["fid"] == pytest.approx(plain["fid"], rel=1e-6)
    assert stats_only["precision"] is None and stats_only["recall"] is None


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clusterar_error(digits_ext, tmp_path):
    np.savez(tmp_path / "noarr.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ClusterarError, match="no 'arr_0'.*images"):
        evaluate_images(tmp_path / "noarr.npz", "digits:val", digits_ext, progress=False)
    np.savez(tmp_path / "float.npz", np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(ClusterarError, match="float32.*uint8"):
        open_images(tmp_path / "float.npz")
    np.savez(tmp_path / "rgba.npz", np.zeros((4, 32, 32, 4), np.uint8))
    with pytest.raises(ClusterarError, match=r"\[4, 32, 32, 4\]"):
        open_images(tmp_path / "rgba.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ClusterarError, match="not a readable .npz"):
        open_images(tmp_path / "junk.npz")
    with pytest.raises(ClusterarError, match="uint8"):
        evaluate_images(np.zeros((4, 32, 32, 3), np.float32), "digits:val", digits_ext, progress=False)
    with pytest.raises(ClusterarError, match="shape"):
        evaluate_images(np.zeros((4, 5, 32, 32), np.uint8), "digits:val", digits_ext, progress=False)
    with pytest.raises(ClusterarError, match="unknown images or reference 'cifar:val'"):
        evaluate_images(np.zeros((4, 32, 32, 3), np.uint8), "cifar:val", digits_ext, progress=False)
    with pytest.raises(ClusterarError, match="more than 3 images"):
        evaluate_images(np.zeros((3, 32, 32, 3), np.uint8), "digits:val", digits_ext, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClusterarError, match="no image files"):
        open_images(tmp_path / "empty")


def test_inception_missing_file_and_missing_package(tmp_path):
    with pytest.raises(ClusterarError, match="Inception weights file not found.*pt_inception-2015-12-05"):
        Inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth", device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    # without torch-fidelity: says what to install; with it: the file is not a readable checkpoint
    with pytest.raises(ClusterarError, match="torch-fidelity|could not read"):
        Inception(junk, device="cpu")
    with pytest.raises(ClusterarError):
        evaluate_images(np.zeros((8, 32, 32, 3), np.uint8), "digits:val", f"inception:{junk}", progress=False)


def test_inception_features_with_torch_fidelity(tmp_path):
    """Only where torch-fidelity imports: our wrapper around its network, on random weights."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception:
        pytest.skip("torch-fidelity (optional extra [inception]) is not importable here")
    torch.manual_seed(0)
    load = torch.nn.Module.load_state_dict
    try:  # build the network once without weights to get a state_dict of the right layout
        torch.nn.Module.load_state_dict = lambda self, *a, **k: None
        empty = tmp_path / "e.pth"
        torch.save({}, empty)
        net = FeatureExtractorInceptionV3("x", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        torch.nn.Module.load_state_dict = load
    torch.save(net.state_dict(), tmp_path / "random.pth")
    ext = Inception(tmp_path / "random.pth", device="cpu")
    feats, probs = ext.extract(ArraySource(np.zeros((2, 32, 32, 3), np.uint8)), progress=False)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ClusterarError, match="does not hold Inception-v3"):
        Inception(tmp_path / "wrong.pth", device="cpu")


# ----------------------------------------------------------------------------- CLI


def test_cli_evaluate(digits_ext, digits_train_nhwc, cache, tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", digits_train_nhwc)
    out = tmp_path / "m" / "metrics.json"
    args = ["evaluate", str(tmp_path / "samples.npz"), "--ref", "digits:val", "--cache-dir", str(cache)]
    assert main([*args, "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert f"{metrics['fid']:.3f}" in printed and "precision (k=3)" in printed
    assert metrics["extractor_fingerprint"] == digits_ext.fingerprint and metrics["n_samples"] == 180
    assert main(["evaluate", str(tmp_path / "nothing.npz"), "--ref", "digits:val"]) == 2
    assert "error: samples file not found" in capsys.readouterr().err
    assert main([*args, "--inception", str(tmp_path / "missing.pth")]) == 2
    assert "Inception weights file not found" in capsys.readouterr().err
    assert main([*args, "--inception", "x.pth", "--extractor", "classifier"]) == 2
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------- class accuracy


def test_class_accuracy_of_true_and_shuffled_labels(digits_ext, cache, tmp_path, capsys):
    """Real val digits with their own labels score the classifier's val accuracy exactly; the same images
    with shuffled labels fall to about chance; the labels come from an ADM npz's arr_1 (and the CLI)."""
    val = load_dataset("digits", "val")
    images = val.images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    labels = val.labels.numpy()
    m = evaluate_images(images, "digits:val", digits_ext, labels=labels, progress=False, device="cpu")
    assert m["class_accuracy"] == pytest.approx(digits_ext.meta["val_accuracy"], abs=1e-12)
    assert m["extractor_val_accuracy"] == digits_ext.meta["val_accuracy"]
    shuffled = np.random.default_rng(0).permutation(labels)
    np.savez(tmp_path / "s.npz", images, shuffled)  # arr_0 images, arr_1 labels: as `clusterar sample`
    args = ["evaluate", str(tmp_path / "s.npz"), "--ref", "digits:val", "--cache-dir", str(cache)]
    assert main([*args, "--out", str(tmp_path / "m.json"), "--no-progress", "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "m.json").read_text())["class_accuracy"]
    expect = float(
        (np.asarray(digits_ext.extract(ArraySource(images), 64, False)[1]).argmax(1) == shuffled).mean()
    )
    assert got == pytest.approx(expect) and got < 0.3  # ten classes: chance is 0.1
    assert "class accuracy" in capsys.readouterr().out
    with pytest.raises(ClusterarError, match="non-negative integers"):
        evaluate_images(images, "digits:val", digits_ext, labels=labels[:5], progress=False, device="cpu")
    with pytest.raises(ClusterarError, match="outside the classifier's 10 classes"):
        class_accuracy(np.full((2, 10), 0.1), np.array([3, 12]))
    # no labels: no class accuracy, and the table says why
    m = evaluate_images(images, "digits:val", digits_ext, progress=False, device="cpu")
    assert m["class_accuracy"] is None and "needs labels" in format_table(m)
