"""Token files: encode a dataset split into one memory-mapped file, metadata, resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clusterar import ClusterarError
from clusterar.cli import main
from clusterar.data import load_dataset, make_views, to_float
from clusterar.lock import LOCK_FILE
from clusterar.tokenizer import VQModel, save_tokenizer
from clusterar.tokens import TokenFile, encode_dataset, shard_rows, smallest_dtype, write_token_file


@pytest.fixture(scope="module")
def tokenizer(make_tokenizer) -> VQModel:
    """Downsampling 2 (16x16 images -> 8x8 tokens) and 300 codes, so ids need int16."""
    return make_tokenizer(0, ch_mult=(1, 2), codebook_size=300, codebook_dim=4)


def test_smallest_dtype():
    assert smallest_dtype(256) == np.uint8
    assert smallest_dtype(257) == np.int16
    assert smallest_dtype(16384) == np.int16
    assert smallest_dtype(65536) == np.int32


def test_encode_split_matches_direct_encoding(tokenizer, tmp_path):
    tf = encode_dataset(
        tokenizer, "digits", "val", tmp_path / "val.safetensors", image_size=16, views="flip", progress=False
    )
    ds = load_dataset("digits", "val", 16)
    assert tf.codes.shape == (len(ds), 2, 64)
    assert tf.codes.dtype == np.int16  # 300 codes do not fit uint8
    assert isinstance(tf.codes, np.memmap)
    assert np.array_equal(tf.labels, ds.labels.numpy())
    assert tf.grid == (8, 8) and tf.codebook_size == 300 and tf.num_classes == 10
    assert tf.meta["tokenizer_fingerprint"] == tokenizer.fingerprint()
    # rows equal encoding the views directly, view 1 is the horizontal flip
    images = torch.stack([ds[i][0] for i in range(5)])
    direct = tokenizer.encode(to_float(make_views(images, "flip", 16).flatten(0, 1))).reshape(5, 2, 64)
    assert np.array_equal(tf.codes[:5], direct.numpy())
    codes, labels = tf.batch(np.array([3, 1]), np.array([1, 0]))
    assert torch.equal(codes, direct[[3, 1], [1, 0]])
    assert codes.dtype == torch.int64 and labels.tolist() == ds.labels[[3, 1]].tolist()
    # no partial files remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.safetensors"]


def test_encoding_records_no_autograd_graph(tokenizer, tmp_path, monkeypatch):
    """encode_dataset runs under no_grad: a graph per batch would cost memory on ImageNet-sized splits."""
    seen = []
    encode = tokenizer.encode

    def recording(x):
        seen.append(torch.is_grad_enabled())
        return encode(x)

    monkeypatch.setattr(tokenizer, "encode", recording)
    encode_dataset(tokenizer, "digits", "val", tmp_path / "v.safetensors", image_size=16, progress=False)
    assert seen and not any(seen)


def test_encode_resumes_from_partial_state(tokenizer, tmp_path):
    out = tmp_path / "val.safetensors"
    full = encode_dataset(
        tokenizer, "digits", "val", tmp_path / "ref.safetensors", image_size=16, views="none", progress=False
    )
    # simulate an interruption: a partial file with the first 100 images done and garbage after them
    encode_dataset(tokenizer, "digits", "val", out, image_size=16, views="none", progress=False)
    tf = TokenFile.open(out)
    part = np.lib.format.open_memmap(
        out.with_name(out.name + ".partial.npy"), mode="w+", dtype=tf.codes.dtype, shape=tf.codes.shape
    )
    part[:100] = tf.codes[:100]
    part[100:] = 0
    part.flush()
    settings = {k: v for k, v in tf.meta.items() if k not in ("kind", "skipped")}
    state = {"settings": settings, "shape": list(tf.codes.shape), "done": 100, "skipped": []}
    out.with_name(out.name + ".partial.json").write_text(json.dumps(state))
    out.unlink()
    again = encode_dataset(tokenizer, "digits", "val", out, image_size=16, views="none", progress=False)
    assert np.array_equal(np.asarray(again.codes), np.asarray(full.codes))


def test_encode_refuses_progress_with_other_settings(tokenizer, tmp_path, caplog):
    """clusterar.resume's policy: progress saved with other settings is refused, naming them, and
    discarded (with a warning) only given restart=True."""
    out = tmp_path / "val.safetensors"
    full = encode_dataset(tokenizer, "digits", "val", out, image_size=16, views="none", progress=False)
    np.lib.format.open_memmap(
        out.with_name(out.name + ".partial.npy"), mode="w+", dtype=full.codes.dtype, shape=full.codes.shape
    ).flush()
    settings = {k: v for k, v in full.meta.items() if k not in ("kind", "skipped", "upscaled")}
    state = {
        "settings": {**settings, "split": "train"},
        "shape": list(full.codes.shape),
        "done": 8,
        "skipped": [],
    }
    out.with_name(out.name + ".partial.json").write_text(json.dumps(state))
    out.unlink()
    with pytest.raises(
        ClusterarError, match=r"other settings.*split: saved 'train', now 'val'.*to start over"
    ):
        encode_dataset(tokenizer, "digits", "val", out, image_size=16, views="none", progress=False)
    again = encode_dataset(
        tokenizer, "digits", "val", out, image_size=16, views="none", progress=False, restart=True
    )
    assert "discarding partial encoding" in caplog.text
    assert np.array_equal(np.asarray(again.codes), np.asarray(full.codes))


def test_ten_crop_views_and_skip_policy(tokenizer, tmp_path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8)).save(
                root / cls / f"{i}.png"
            )
    (root / "dog" / "broken.png").write_bytes(b"")
    with pytest.raises(ClusterarError, match="broken.png"):
        encode_dataset(
            tokenizer, f"folder:{root}", "train", tmp_path / "t.safetensors", image_size=16, progress=False
        )
    tf = encode_dataset(
        tokenizer,
        f"folder:{root}",
        "train",
        tmp_path / "t.safetensors",
        image_size=16,
        views="ten-crop",
        on_error="skip",
        progress=False,
    )
    assert tf.codes.shape == (6, 10, 64)
    assert tf.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(tf.meta["skipped"]) == 1 and tf.meta["skipped"][0].endswith("broken.png")


def test_token_file_errors(tokenizer, tmp_path):
    with pytest.raises(ClusterarError, match="not found"):
        TokenFile.open(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ClusterarError, match="truncated"):
        TokenFile.open(tmp_path / "junk.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tok.safetensors")
    with pytest.raises(ClusterarError, match="not a token file"):
        TokenFile.open(tmp_path / "tok.safetensors")
    write_token_file(
        tmp_path / "t.safetensors",
        np.zeros((2, 1, 4), np.uint8),
        np.zeros(2, np.int64),
        {"tokenizer_fingerprint": "abc"},
    )
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-3])
    with pytest.raises(ClusterarError, match="truncated"):
        TokenFile.open(tmp_path / "cut.safetensors")
    with pytest.raises(ClusterarError, match="re-encode"):
        TokenFile.open(tmp_path / "t.safetensors").check_tokenizer(tokenizer)
    with pytest.raises(ClusterarError, match="--views"):
        encode_dataset(
            tokenizer, "digits", "val", tmp_path / "v.safetensors", image_size=16, views="five-crop"
        )


def test_cli_encode_and_info(tokenizer, tmp_path, capsys):
    save_tokenizer(tokenizer, tmp_path / "tok.safetensors")
    rc = main(
        [
            "encode",
            "--tokenizer",
            str(tmp_path / "tok.safetensors"),
            "--data",
            "digits",
            "--splits",
            "val",
            "--image-size",
            "16",
            "--views",
            "none",
            "--out",
            str(tmp_path / "tokens"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert TokenFile.open(tmp_path / "tokens" / "val.safetensors").codes.shape[1:] == (1, 64)
    assert main(["info", str(tmp_path / "tokens" / "val.safetensors")]) == 0
    assert '"kind": "clusterar.tokens"' in capsys.readouterr().out
    # bad input: one clear line on stderr, exit status 2, no traceback
    rc = main(["encode", "--tokenizer", str(tmp_path / "nope.safetensors"), "--data", "digits"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.safetensors" in err and "Traceback" not in err


def test_fingerprint_covers_values_shapes_and_scalars():
    from clusterar.fileio import fingerprint

    a = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(7)}  # a 0-d tensor hashes too
    assert fingerprint(a) == fingerprint({k: v.clone() for k, v in a.items()})
    assert fingerprint(a) != fingerprint({**a, "step": torch.tensor(8)})
    assert fingerprint(a) != fingerprint({**a, "w": a["w"].reshape(3, 2)})  # same bytes, other shape
    assert fingerprint(a) != fingerprint({**a, "w": a["w"].double()})


# ----------------------------------------------------------------------------- torchrun


def test_shards_are_whole_batches_that_cover_every_row_once():
    for n, batch, world in ((185, 32, 2), (185, 32, 4), (10, 4, 8), (64, 64, 3), (1, 1, 2)):
        shards = [shard_rows(n, batch, r, world) for r in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == n
        assert all(
            a[1] == b[0] for a, b in zip(shards[:-1], shards[1:], strict=True)
        )  # contiguous, no overlap
        assert all(lo % batch == 0 and (hi % batch == 0 or hi == n) for lo, hi in shards)


def _encode_args(tok: Path, out: Path) -> list[str]:
    return [
        *("--tokenizer", str(tok), "--data", "digits", "--splits", "val", "--image-size", "16"),
        *(
            "--views",
            "flip",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--save-every",
            "0",
        ),
    ]


def test_two_processes_write_the_one_process_file_and_resume_after_a_kill(tokenizer, tmp_path, torchrun):
    save_tokenizer(tokenizer, tmp_path / "tok.safetensors")
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "clusterar",
            "encode",
            *_encode_args(tmp_path / "tok.safetensors", tmp_path / "one"),
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    # rank 1 is killed at its 2nd batch; the same command continues, with 2 processes
    args = _encode_args(tmp_path / "tok.safetensors", tmp_path / "two")
    killed = torchrun(args, tmp_path, env={"CLUSTERAR_KILL_AT": "encode.batch:2@1"}, command="encode")
    assert killed.returncode != 0
    # (rank 0, ended by torchrun's SIGTERM, may leave its lock file: the next run takes it over)
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name != LOCK_FILE) == [
        "val.safetensors.partial.npy",
        "val.safetensors.partial.rank0.json",
        "val.safetensors.partial.rank1.json",
    ]
    # one process cannot continue what two started: said before any work
    rc = main(["encode", *args])
    assert rc == 2
    res = torchrun(args, tmp_path, command="encode")
    assert res.returncode == 0, res.stderr
    a, b = (
        TokenFile.open(tmp_path / "one" / "val.safetensors"),
        TokenFile.open(tmp_path / "two" / "val.safetensors"),
    )
    assert np.array_equal(a.codes, b.codes) and a.codes.dtype == b.codes.dtype
    assert np.array_equal(a.labels, b.labels)
    assert a.meta == b.meta
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "val.safetensors"
    ]  # no partial files left


def test_a_changed_process_count_is_refused_naming_the_file(tokenizer, tmp_path):
    out = tmp_path / "val.safetensors"
    (tmp_path / "val.safetensors.partial.rank0.json").write_text(json.dumps({"world": 2, "done": 0}))
    with pytest.raises(ClusterarError, match=r"partial.rank0.json.*2 process.*--nproc_per_node 2"):
        encode_dataset(tokenizer, "digits", "val", out, image_size=16, progress=False)
