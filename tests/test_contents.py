"""Files checked against their contents at load (issue 25 §4): a safetensors header against its bytes, a
token file against its metadata and its tokenizer, an npz's labels, a dataset folder's class links.

Every case is a file made by hand that today's loaders trusted (a model trained on a lying grid) or read into
a traceback (IndexError, KeyError 'BF16', "mmap length is greater than file size"); each now gets the one
line of its kind: what is wrong, which file, what to do.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from clusterar import ClusterarError
from clusterar.data import load_dataset
from clusterar.fileio import FileError
from clusterar.metrics import ClassifierExtractor, NpzSource, evaluate_images, open_images
from clusterar.tokens import TokenFile, write_token_file

N, L, K, CLASSES = 6, 64, 300, 10  # images, tokens per image (8x8), codebook size, classes


def token_file(path: Path, codes: np.ndarray | None = None, labels: np.ndarray | None = None, **meta) -> Path:
    """A token file of N images with one view of 8x8 int16 codes in [0, K), its metadata overridden by `meta`."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, (N, 1, L)).astype(np.int16) if codes is None else codes
    labels = np.arange(N) % CLASSES if labels is None else labels
    base = {"tokenizer_fingerprint": "t", "codebook_size": K, "grid": [8, 8], "num_classes": CLASSES}
    write_token_file(path, codes, labels, {**base, **meta})
    return path


def read_parts(path: Path) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_parts(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def refused(path: Path, *parts: str) -> str:
    """The one-line error of opening token file `path`, which must contain every one of `parts`."""
    with pytest.raises(ClusterarError) as e:
        TokenFile.open(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


def test_a_valid_token_file_opens(tmp_path):
    tf = TokenFile.open(token_file(tmp_path / "t.safetensors"))
    assert tf.codes.shape == (N, 1, L) and tf.grid == (8, 8)


# ---------------------------------------------------------------- token files against their metadata


def test_a_grid_that_does_not_match_the_tokens_per_image(tmp_path):
    """16x16 claimed for 8x8 codes: a model trained on it would sample 64 px images from a 32 px tokenizer."""
    path = token_file(tmp_path / "t.safetensors", grid=[16, 16])
    refused(path, "token file", "grid is [16, 16]", "64 tokens per image", "clusterar encode")


def test_codes_outside_the_codebook(tmp_path):
    codes = np.full((N, 1, L), 5, np.int16)
    codes[3, 0, 7] = K  # one id past the codebook
    path = token_file(tmp_path / "t.safetensors", codes)
    refused(
        path, f"{K} is outside [0, {K})", "codebook_size", "copy it again, or make it with `clusterar encode`"
    )


def test_negative_codes(tmp_path):
    codes = np.full((N, 1, L), 5, np.int16)
    codes[-1, 0, -1] = -1
    refused(token_file(tmp_path / "t.safetensors", codes), "-1 is outside [0, 300)")


def test_labels_past_num_classes(tmp_path):
    labels = np.arange(N)
    labels[2] = CLASSES
    refused(
        token_file(tmp_path / "t.safetensors", labels=labels),
        "labels",
        f"{CLASSES} is outside [0, {CLASSES})",
    )


def test_float_codes(tmp_path):
    path = token_file(tmp_path / "t.safetensors", np.zeros((N, 1, L), np.float32))
    refused(path, "codes float32", "integer ids")


def test_a_codebook_size_other_than_the_tokenizers(make_tokenizer, tmp_path):
    """Same fingerprint, another size in the metadata: ids past the tokenizer's codebook would not decode."""
    tok = make_tokenizer(0)
    path = token_file(
        tmp_path / "t.safetensors",
        np.zeros((N, 1, L), np.int16),
        codebook_size=16384,
        tokenizer_fingerprint=tok.fingerprint(),
    )
    with pytest.raises(
        ClusterarError, match="says its codebook has 16384 codes, but tokenizer T.safetensors"
    ) as e:
        TokenFile.open(path).check_tokenizer(tok, "T.safetensors")
    assert "re-encode the images with `clusterar encode --tokenizer T.safetensors`" in str(e.value)
    token_file(
        path, np.zeros((N, 1, L), np.int16), codebook_size=512, tokenizer_fingerprint=tok.fingerprint()
    )
    TokenFile.open(path).check_tokenizer(tok)  # the right size passes


# ---------------------------------------------------------------- safetensors headers against their bytes


def test_a_header_shape_that_does_not_match_the_bytes(tmp_path):
    header, data = read_parts(token_file(tmp_path / "t.safetensors"))
    header["codes"]["shape"] = [N, 1, 2 * L]  # twice the bytes its offsets give it
    path = write_parts(tmp_path / "shape.safetensors", header, data)
    refused(path, "is damaged (tensor 'codes' is I16 [6, 1, 128], 1536 bytes, but its header gives it 768)")


def test_a_header_dtype_that_does_not_match_the_bytes(tmp_path):
    header, data = read_parts(token_file(tmp_path / "t.safetensors"))
    header["codes"]["dtype"] = "I32"
    path = write_parts(tmp_path / "dtype.safetensors", header, data)
    refused(path, "is damaged (tensor 'codes' is I32")


def test_an_unknown_dtype_in_a_tokens_header(tmp_path):
    """BF16 is a safetensors dtype numpy cannot map (KeyError 'BF16' before), FOO no dtype at all."""
    header, data = read_parts(token_file(tmp_path / "t.safetensors"))
    header["codes"]["dtype"] = "BF16"  # also 2 bytes: the byte range still fits
    refused(write_parts(tmp_path / "bf16.safetensors", header, data), "tensor 'codes' has dtype BF16")
    header["codes"]["dtype"] = "FOO"
    refused(write_parts(tmp_path / "foo.safetensors", header, data), "tensor 'codes' has unknown dtype 'FOO'")


def test_a_truncated_data_section(tmp_path):
    """The last tensor's shape runs past the end of the file while its offsets do not ("mmap length is
    greater than file size" before)."""
    header, data = read_parts(token_file(tmp_path / "t.safetensors"))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["shape"][0] += 1000
    refused(write_parts(tmp_path / "cut.safetensors", header, data), "is damaged", f"tensor '{last}'")


def test_malformed_data_offsets(tmp_path):
    header, data = read_parts(token_file(tmp_path / "t.safetensors"))
    begin, end = header["codes"]["data_offsets"]
    header["codes"]["data_offsets"] = [-8, end - begin - 8]
    refused(write_parts(tmp_path / "neg.safetensors", header, data), "malformed header")


def test_a_symlink_loop_is_a_loop_not_missing(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    refused(loop, "is a symbolic link loop")
    with pytest.raises(FileError, match="not found"):
        TokenFile.open(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- npz samples


def images(n: int = 20) -> np.ndarray:
    return load_dataset("digits", "val").images[:n].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def test_an_npz_label_outside_the_classifiers_classes(tmp_path):
    labels = np.arange(20) % CLASSES
    labels[4] = 12
    np.savez(tmp_path / "s.npz", images(), labels)
    ext = ClassifierExtractor(
        "digits", tmp_path / "cache", device="cpu", progress=False, epochs=1, max_images=100
    )
    with pytest.raises(ClusterarError) as e:
        evaluate_images(tmp_path / "s.npz", "digits:val", ext, progress=False, device="cpu")
    assert str(e.value) == (
        f"{tmp_path / 's.npz'} arr_1: class label 12 (image 4) is outside the 10 classes; pass the class each "
        "image was sampled for"
    )


def test_a_negative_npz_label(tmp_path):
    labels = np.arange(20) % CLASSES
    labels[7] = -3
    np.savez(tmp_path / "s.npz", images(), labels)
    with pytest.raises(ClusterarError, match=r"s\.npz arr_1: class label -3 \(image 7\) is negative"):
        NpzSource(tmp_path / "s.npz")


def test_a_pickled_object_array_in_arr_1(tmp_path):
    marker = tmp_path / "ran"
    labels = np.empty(20, dtype=object)
    labels[:] = [{"class": i} for i in range(20)]
    np.savez(tmp_path / "s.npz", images(), labels)
    with pytest.raises(ClusterarError) as e:
        NpzSource(tmp_path / "s.npz")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"{tmp_path / 's.npz'} arr_1 is an array of pickled Python objects"
    )
    assert "labels.astype(numpy.int64)" in msg and not marker.exists()


# ---------------------------------------------------------------- dataset folders


def image_folder(root: Path) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / c / f"{i}.png")
    return root


def test_a_class_folder_that_links_to_the_dataset_root(tmp_path):
    root = image_folder(tmp_path / "data")
    assert load_dataset(f"folder:{root}", image_size=8).num_classes == 2
    (root / "z").symlink_to(root)
    with pytest.raises(ClusterarError) as e:
        load_dataset(f"folder:{root}", image_size=8)
    assert str(e.value).startswith(
        f"folder:{root}: class folder {root / 'z'} leads to {root.resolve()}, which holds"
    )


def test_a_class_folder_that_links_above_the_split(tmp_path):
    root = image_folder(tmp_path / "data" / "train")
    (root / "up").symlink_to(tmp_path)
    with pytest.raises(ClusterarError, match="class folder .*up leads to"):
        load_dataset(f"folder:{root.parent}", "train", image_size=8)


def test_a_linked_class_folder_elsewhere_is_fine(tmp_path):
    root = image_folder(tmp_path / "data")
    other = image_folder(tmp_path / "other")
    (root / "c").symlink_to(other / "a")
    assert load_dataset(f"folder:{root}", image_size=8).class_names == ["a", "b", "c"]


def test_dataset_symlink_loops(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ClusterarError, match="is a symbolic link loop"):
        load_dataset(f"folder:{loop}", image_size=8)
    with pytest.raises(ClusterarError, match=f"image folder {loop} is a symbolic link loop"):
        open_images(loop)  # `clusterar evaluate LOOP`
    (tmp_path / "s.npz").symlink_to(tmp_path / "s.npz")
    with pytest.raises(ClusterarError, match=r"samples file .*s\.npz is a symbolic link loop"):
        open_images(tmp_path / "s.npz")
    root = image_folder(tmp_path / "data")
    os.symlink(root / "x", root / "x")
    with pytest.raises(ClusterarError, match=f"{root / 'x'} is a symbolic link loop"):
        load_dataset(f"folder:{root}", image_size=8)


def test_train_on_a_lying_token_file_is_one_line(tmp_path, capsys):
    """What `clusterar train` answers before any work: the error line, exit status 2, nothing written."""
    from clusterar.cli import main

    path = token_file(tmp_path / "t.safetensors", grid=[16, 16])
    out = str(tmp_path / "run")
    rc = main(["train", "--tokens", str(path), "--tokenizer", str(path), "--out", out, "--steps", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: token file {path} says its grid is [16, 16], but it holds 64 tokens")
    assert not (tmp_path / "run").exists()
