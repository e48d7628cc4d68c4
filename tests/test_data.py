"""Tests for clusterar.data: bundled datasets, folder datasets on tiny real files, views, pixel maps."""

import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from clusterar.data import (
    DATASET_HELP,
    ImageDataset,
    center_crop_arr,
    collate_images,
    load_dataset,
    make_views,
    to_float,
    to_uint8,
    view_load_size,
)
from clusterar.errors import ClusterarError

# ----------------------------------------------------------------------------------------------------
# helpers


def rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_folder(root, classes=("cat", "dog"), n=2, size=(20, 14), ext=".png"):
    """root/<class>/<i><ext> with small random RGB images."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            rgb(size[1], size[0], seed=i).save(root / c / f"{i}{ext}")
    return root


def write_truncated_jpeg(path):
    buf = path.with_suffix(".full.jpg")
    rgb(64, 64).save(buf, quality=95)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------------
# bundled datasets


def test_mnist_shapes_and_splits():
    train, val, full = (load_dataset("mnist", s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (4500, 500, 5000)
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and isinstance(label, int)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert img[:, :2].max() == 0 and img[:, :, -2:].max() == 0  # 2-pixel zero pad
    assert img.max() > 100  # a real digit, not blank
    assert train.labels.dtype == torch.int64 and train.labels.shape == (4500,)
    assert train.num_classes == 10 and train.class_names == [str(c) for c in range(10)]
    assert torch.bincount(val.labels, minlength=10).tolist() == [50] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [450] * 10
    assert train.path(3) == "mnist[3]"


def test_mnist_split_disjoint_and_deterministic():
    full = load_dataset("mnist", "all")
    train, val = load_dataset("mnist", "train"), load_dataset("mnist", "val")
    # identify every image by its bytes + label: train and val partition the full set
    key = lambda d: {(d.images[i].numpy().tobytes(), int(d.labels[i])) for i in range(len(d))}  # noqa: E731
    kt, kv, ka = key(train), key(val), key(full)
    assert not kt & kv
    assert kt | kv == ka
    again = load_dataset("mnist", "val")
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    again.images[0].fill_(7)  # mutating one dataset must not corrupt the in-process cache
    assert not torch.equal(load_dataset("mnist", "val").images[0], again.images[0])


def test_mnist_other_size():
    d = load_dataset("mnist", "val", image_size=16)
    assert d[0][0].shape == (3, 16, 16) and d.image_size == 16


def test_digits_shapes_and_split():
    train, val, full = (load_dataset("digits", s) for s in ("train", "val", "all"))
    assert len(full) == 1797 and len(train) + len(val) == 1797
    img, _ = val[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and img.max() > 200
    per_class = torch.bincount(full.labels, minlength=10)
    assert torch.bincount(val.labels, minlength=10).tolist() == [(n + 9) // 10 for n in per_class.tolist()]
    assert load_dataset("digits", "train", image_size=24)[0][0].shape == (3, 24, 24)


# ----------------------------------------------------------------------------------------------------
# folder datasets


def test_folder_labels_sorted_and_lazy(tmp_path):
    make_folder(tmp_path / "ds", classes=("zebra", "ant", "mole"), n=2)
    (tmp_path / "ds" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (tmp_path / "ds" / "ant" / "notes.txt").write_text("not an image")
    d = load_dataset(f"folder:{tmp_path / 'ds'}", image_size=8)
    assert d.class_names == ["ant", "mole", "zebra"] and d.num_classes == 3
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2] and d.labels.dtype == torch.int64
    assert d.path(4) == str(tmp_path / "ds" / "zebra" / "0.png")
    img, label = d[5]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label == 2
    assert pickle.loads(pickle.dumps(d)).path(5) == d.path(5)  # DataLoader workers may pickle it


def test_folder_split_subfolder(tmp_path):
    make_folder(tmp_path / "in" / "train", classes=("a", "b"), n=3)
    make_folder(tmp_path / "in" / "val", classes=("a", "b"), n=1)
    train = load_dataset(f"folder:{tmp_path / 'in'}", "train", image_size=8)
    val = load_dataset(f"folder:{tmp_path / 'in'}", "val", image_size=8)
    assert (len(train), len(val)) == (6, 2) and train.class_names == val.class_names == ["a", "b"]
    assert val.path(0).startswith(str(tmp_path / "in" / "val"))
    with pytest.raises(ClusterarError, match="no 'test'") as e:
        load_dataset(f"folder:{tmp_path / 'in'}", "test")
    assert str(tmp_path / "in") in str(e.value)


def test_flat_val_folder_is_an_error(tmp_path):
    make_folder(tmp_path / "in" / "train", classes=("a",), n=1)
    (tmp_path / "in" / "val").mkdir()
    rgb(8, 8).save(tmp_path / "in" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ClusterarError, match="no class sub-folders") as e:
        load_dataset(f"folder:{tmp_path / 'in'}", "val")
    assert str(tmp_path / "in" / "val") in str(e.value) and "1 images" in str(e.value)


@pytest.mark.parametrize("w,h", [(50, 20), (20, 50), (17, 16), (8, 9), (130, 70)])
def test_center_crop_size_non_square(tmp_path, w, h):
    make_folder(tmp_path / "ds", classes=("c",), n=1, size=(w, h), ext=".jpg")
    d = load_dataset(f"folder:{tmp_path / 'ds'}", image_size=16)
    assert d[0][0].shape == (3, 16, 16)


def test_center_crop_arr_matches_reference():
    """Independent reimplementation of ADM's center_crop_arr (box halving, bicubic, crop) on a big image."""
    img = rgb(150, 401, seed=3)
    ref = img.resize((200, 75), Image.BOX).resize((100, 37), Image.BOX)  # 150, 75 >= 64; 37 < 64
    ref = ref.resize((86, 32), Image.BICUBIC)  # round(100 * 32 / 37) = 86
    ref = np.array(ref)[:, 27:59]  # (86 - 32) // 2 = 27
    assert np.array_equal(center_crop_arr(img, 32), ref)


def test_mode_conversions_warn(tmp_path, caplog):
    root = tmp_path / "ds"
    (root / "c").mkdir(parents=True)
    Image.new("L", (12, 12), 90).save(root / "c" / "gray.png")
    Image.new("RGBA", (12, 12), (255, 0, 0, 0)).save(root / "c" / "rgba.png")  # fully transparent
    Image.new("CMYK", (12, 12), (0, 0, 0, 0)).save(root / "c" / "cmyk.jpg")
    Image.fromarray(np.full((12, 12), 65535, np.uint16)).save(root / "c" / "gray16.png")
    Image.new("RGB", (12, 12), (1, 2, 3)).save(root / "c" / "rgb.png")
    d = load_dataset(f"folder:{root}", image_size=8)
    with caplog.at_level(logging.WARNING, logger="clusterar.data"):
        out = {d.path(i).rsplit("/", 1)[1]: d[i][0] for i in range(len(d))}
    for img in out.values():
        assert img.shape == (3, 8, 8) and img.dtype == torch.uint8
    assert (out["gray.png"] == 90).all()
    assert (out["rgba.png"] == 255).all()  # transparent -> white background
    assert (out["cmyk.jpg"] > 245).all()  # CMYK 0,0,0,0 is white
    assert (out["gray16.png"] == 255).all()  # 16-bit scaled, not clipped
    text = caplog.text
    for name, mode in [("gray.png", "L"), ("rgba.png", "RGBA"), ("cmyk.jpg", "CMYK"), ("gray16.png", "I;16")]:
        assert str(root / "c" / name) in text and mode in text
    assert "rgb.png" not in text


def test_grey_16bit_midtones(tmp_path):
    root = tmp_path / "ds"
    (root / "c").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 257 * 100, np.uint16)).save(root / "c" / "g.png")
    assert (load_dataset(f"folder:{root}", image_size=8)[0][0] == 100).all()


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_corrupt_files(tmp_path, kind):
    root = make_folder(tmp_path / "ds", classes=("a",), n=1)
    bad = root / "a" / "bad.jpg"
    if kind == "truncated":
        write_truncated_jpeg(bad)
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("hello, not an image")
    spec = f"folder:{root}"
    d = load_dataset(spec, image_size=8)
    i = [d.path(j) for j in range(len(d))].index(str(bad))
    with pytest.raises(ClusterarError) as e:
        d[i]
    assert str(bad) in str(e.value) and "skip" in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    d = load_dataset(spec, image_size=8, on_error="skip")
    assert d[i] == (None, 0)
    images, labels, ok = collate_images([d[j] for j in range(len(d))])
    assert ok.tolist() == [j != i for j in range(len(d))]
    assert images.shape == (len(d) - 1, 3, 8, 8) and labels.tolist() == [0] * (len(d) - 1)


def test_dataloader_skip(tmp_path):
    root = make_folder(tmp_path / "ds", classes=("a", "b"), n=2)
    (root / "b" / "zero.png").write_bytes(b"")
    d = load_dataset(f"folder:{root}", image_size=8, on_error="skip")
    loader = torch.utils.data.DataLoader(d, batch_size=4, collate_fn=collate_images)
    batches = list(loader)
    oks = torch.cat([ok for _, _, ok in batches])
    assert oks.sum() == 4 and [d.path(i) for i in torch.nonzero(~oks).flatten().tolist()] == [
        str(root / "b" / "zero.png")
    ]
    assert torch.cat([lab for _, lab, _ in batches]).tolist() == [0, 0, 1, 1]


def test_collate_all_failed():
    images, labels, ok = collate_images([(None, 1), (None, 2)])
    assert images.shape[0] == 0 and images.dtype == torch.uint8 and labels.shape == (0,)
    assert ok.tolist() == [False, False]


# ----------------------------------------------------------------------------------------------------
# bad input


def test_bad_specs(tmp_path):
    def err(*args, **kw) -> str:
        with pytest.raises(ClusterarError) as e:
            load_dataset(*args, **kw)
        return str(e.value)

    msg = err("cifar10")
    assert "cifar10" in msg and "mnist" in msg and "digits" in msg and "folder:" in msg
    assert str(tmp_path / "nope") in err(f"folder:{tmp_path / 'nope'}")
    assert "folder:" in err("folder:")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert str(f) in err(f"folder:{f}") and "not a folder" in err(f"folder:{f}")

    (tmp_path / "flat").mkdir()
    rgb(8, 8).save(tmp_path / "flat" / "a.png")
    msg = err(f"folder:{tmp_path / 'flat'}")
    assert str(tmp_path / "flat") in msg and "<class>" in msg

    root = make_folder(tmp_path / "ds", classes=("full",), n=1)
    (root / "empty1").mkdir()
    (root / "empty2").mkdir()
    (root / "empty2" / "readme.txt").write_text("x")
    msg = err(f"folder:{root}")
    assert "empty1" in msg and "empty2" in msg and "full" not in msg.split("(")[1] and str(root) in msg

    msg = err("mnist", "test")
    assert "test" in msg and "mnist" in msg and "train, val, all" in msg
    assert "digits" in err("digits", "validation")
    assert "ignore" in err("mnist", on_error="ignore")
    assert "4" in err("mnist", image_size=4)
    assert "../x" in err(f"folder:{root}", "../x")


# ----------------------------------------------------------------------------------------------------
# views and pixel maps


def test_make_views_shapes():
    for views, v in [("none", 1), ("flip", 2), ("ten-crop", 10)]:
        s = view_load_size(32, views)
        x = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8)
        out = make_views(x, views, 32)
        assert out.shape == (2, v, 3, 32, 32) and out.dtype == torch.uint8
    assert view_load_size(32, "ten-crop") == 35 and view_load_size(256, "ten-crop") == 281
    with pytest.raises(ClusterarError, match="35"):
        make_views(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "ten-crop", 32)
    with pytest.raises(ClusterarError, match="bogus"):
        view_load_size(32, "bogus")


def test_flip_and_ten_crop_content():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    v = make_views(x, "flip", 32)
    assert torch.equal(v[:, 0], x) and torch.equal(v[:, 1], torch.flip(x, dims=[-1]))

    for size, s in [(32, 35), (256, 281)]:  # odd margins: torchvision rounds the centre offset
        x = torch.randint(0, 256, (1, 3, s, s), dtype=torch.uint8)
        v = make_views(x, "ten-crop", size)
        o = int(round((s - size) / 2))
        assert torch.equal(v[:, 4], x[..., o : o + size, o : o + size])
        assert torch.equal(v[:, 0], x[..., :size, :size])
        assert torch.equal(v[:, 3], x[..., -size:, -size:])
        # second five are crops of the flipped image, as in torchvision: flipped top-left == flip of
        # the original top-right, and the flipped centre is cut at the same rounded offset of the
        # flipped image (for an odd margin, one pixel off the flip of the original centre crop)
        xf = torch.flip(x, dims=[-1])
        assert torch.equal(v[:, 5], torch.flip(v[:, 1], dims=[-1]))
        assert torch.equal(v[:, 9], xf[..., o : o + size, o : o + size])


def test_float_roundtrip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]


def test_help_and_api():
    assert "mnist" in DATASET_HELP and "folder:" in DATASET_HELP and "skip" in DATASET_HELP
    assert "%" not in DATASET_HELP  # argparse would try to format it
    assert issubclass(ImageDataset, torch.utils.data.Dataset)
