"""The classifier extractor on a user's own labelled colour folder: no downloaded weights, any image size,
held-out accuracy recorded, cached under a fingerprint of the data, and `clusterar evaluate` using it."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from clusterar import classifier as clf
from clusterar.cli import main
from clusterar.data import load_dataset
from clusterar.errors import ClusterarError
from clusterar.metrics import ClassifierExtractor, evaluate_images, open_images, reference_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(epochs=4, width=8, lr=0.01)  # a classifier of about a second


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shapes):
    return shapes.write(tmp_path_factory.mktemp("shapes"))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def val_images(root) -> tuple[np.ndarray, np.ndarray]:
    """The val split as the sampler writes samples: uint8 [N, 32, 32, 3] and labels."""
    val = load_dataset(f"folder:{root}", "val", 32)
    items = [val[i] for i in range(len(val))]
    images = np.stack([x.permute(1, 2, 0).numpy() for x, _ in items])
    return images, np.array([int(y) for _, y in items])


def test_colour_folder_classifier_reads_its_classes(folder, cache, caplog):
    caplog.set_level(logging.INFO, logger="clusterar.classifier")
    model, meta = clf.load_classifier(f"folder:{folder}", cache, progress=False, **FAST)
    c = meta["config"]
    assert (c["channels"], c["num_classes"], c["input_size"]) == (3, 3, 32)
    assert meta["n_train"] == 3 * 24 and meta["n_val"] == 3 * 8  # the folder's own train/ and val/
    assert meta["val_accuracy"] >= 0.9, meta  # colour and shape separate the classes
    path = clf.classifier_path(clf.ClassifierConfig(**c), cache)
    assert path.is_file() and path.name.startswith(f"classifier-folder-{folder.name}-")
    # a second load is a cache hit with the same weights
    _, again = clf.load_classifier(f"folder:{folder}", cache, progress=False, **FAST)
    assert again["weights_fingerprint"] == meta["weights_fingerprint"] and "cache hit" in caplog.text

    # the class accuracy of the val images under their own labels is the recorded val accuracy; under
    # shuffled labels it falls toward chance (1/3)
    ext = ClassifierExtractor(f"folder:{folder}", cache, device="cpu", progress=False, **FAST)
    images, labels = val_images(folder)
    m = evaluate_images(
        images, str(folder / "val"), ext, labels=labels, progress=False, device="cpu", image_size=32
    )
    assert m["class_accuracy"] == pytest.approx(meta["val_accuracy"], abs=1e-12)
    assert m["extractor_val_accuracy"] == meta["val_accuracy"] and m["fid"] < 5.0
    shuffled = np.roll(labels, 8)  # every image labelled with the next class
    m = evaluate_images(
        images, str(folder / "val"), ext, labels=shuffled, progress=False, device="cpu", image_size=32
    )
    assert m["class_accuracy"] <= 0.1


def test_changed_data_is_a_new_classifier(tmp_path, cache, shapes):
    root = shapes.write(tmp_path / "d", n_train=6, n_val=2)
    before = clf.data_fingerprint(f"folder:{root}")
    assert before == clf.data_fingerprint(f"folder:{root}")
    extra = root / "train" / shapes.CLASSES[0] / "extra.png"
    shapes.image(0, np.random.default_rng(9)).save(extra)
    assert clf.data_fingerprint(f"folder:{root}") != before
    os.utime(extra, ns=(1, 1))  # same files, other modification time: also new
    touched = clf.data_fingerprint(f"folder:{root}")
    assert touched not in (before, "")
    assert clf.data_fingerprint("mnist") == ""


def test_folder_without_split_folders_holds_out_a_tenth(tmp_path, cache, shapes):
    root = shapes.write(tmp_path / "flat", n_train=18, n_val=2, splits=False)  # 20 per class, no train/
    _, meta = clf.load_classifier(f"folder:{root}", cache, progress=False, **FAST)
    assert meta["n_train"] + meta["n_val"] == 60 and meta["n_val"] == 6  # a tenth of each class
    assert reference_dataset(open_images(str(root), 32)) == f"folder:{root}"


def test_indistinguishable_classes_warn(tmp_path, cache, caplog):
    """Classes whose images are alike: the classifier cannot tell them apart, and the metrics say so."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for name in ("a", "b", "c"):
            (tmp_path / "noise" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "noise" / split / name / f"{i}.png"
                )
    caplog.set_level(logging.WARNING, logger="clusterar.classifier")
    _, meta = clf.load_classifier(f"folder:{tmp_path / 'noise'}", cache, progress=False, **FAST)
    assert meta["val_accuracy"] < clf.LOW_ACCURACY and "say little about the images" in caplog.text


def test_reference_dataset_of_folders(folder, tmp_path):
    assert reference_dataset(open_images(str(folder / "val"), 32)) == f"folder:{folder}"
    assert reference_dataset(open_images(str(folder), 32, require_images=False)) == f"folder:{folder}"
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    assert reference_dataset(open_images(str(loose), 32)) is None  # images, but no classes


def test_cli_evaluate_on_a_folder_needs_no_weights(folder, cache, tmp_path, capsys):
    images, labels = val_images(folder)
    np.savez(tmp_path / "s.npz", images, labels)
    out = tmp_path / "m.json"
    args = ["evaluate", str(tmp_path / "s.npz"), "--ref", str(folder / "val"), "--cache-dir", str(cache)]
    args += ["--image-size", "32"]  # the folder's images have many sizes: centre-cropped to one
    assert main([*args, "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    m = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert m["extractor_val_accuracy"] > 0.5 and m["class_accuracy"] == pytest.approx(
        m["extractor_val_accuracy"]
    )
    assert "class accuracy" in printed
    # a folder of images without classes: the error says what to pass instead
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    assert main(["evaluate", str(tmp_path / "s.npz"), "--ref", str(loose), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "classifier:folder:PATH" in err and "--inception" in err
    with pytest.raises(ClusterarError, match="no classifier for dataset"):
        clf.load_classifier("imagenet", cache)
