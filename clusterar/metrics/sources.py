"""Images to evaluate, in uint8 batches: arrays, ADM-style .npz files (streamed), image folders and the
bundled datasets ("mnist:val"), each with an identity that keys the reference-statistics cache."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..classifier import CLASSIFIER_DATA, to_nchw_uint8
from ..data import IMAGE_EXTENSIONS, SPLIT_NAMES, load_dataset, read_image, to_rgb
from ..errors import ClusterarError
from ..fileio import check_file, file_error, fingerprint, first_line, is_symlink_loop


class ImageSource:
    """uint8 images yielded in batches as [B, C, H, W] tensors, with an identity for caching, and the
    class each image was made for when the source knows it (an ADM npz's arr_1)."""

    name: str
    labels: np.ndarray | None = None
    labels_from: str = "labels"  # where `labels` came from, as errors name it

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def identity(self) -> str | None:
        """A string that changes when the images do; None means "do not cache"."""
        return None


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray | torch.Tensor, name: str = "array", labels: Any = None):
        self.images = to_nchw_uint8(images, name)
        self.name = name
        self.labels = None if labels is None else check_labels(labels, len(self.images), name)
        self.labels_from = name

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.images), batch_size):
            yield self.images[i : i + batch_size]


class BundledSource(ArraySource):
    def __init__(self, dataset: str, split: str):
        data = load_dataset(dataset, split, 32)
        super().__init__(data.images, f"{dataset}:{split}", labels=data.labels)
        self.dataset, self.split = dataset, split

    def identity(self) -> str:
        return f"{self.name}:{fingerprint(self.images)}"


def check_labels(labels: Any, n: int, where: str, num_classes: int | None = None) -> np.ndarray:
    """Class ids [n] as int64, each in [0, num_classes) when that is given, or a clear error naming `where`
    (the file and its array, for an npz's arr_1)."""
    arr = np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ClusterarError(
            f"{where}: class labels must be {n} non-negative integers (one per image), got {arr.dtype} "
            f"{list(arr.shape)}"
        )
    if n and (arr.min() < 0 or (num_classes is not None and arr.max() >= num_classes)):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        why = "is negative (class ids count from 0)" if bad < 0 else f"is outside the {num_classes} classes"
        raise ClusterarError(
            f"{where}: class label {bad} (image {int(np.flatnonzero(arr == bad)[0])}) {why}; pass the "
            "class each image was sampled for"
        )
    return arr.astype(np.int64)


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class NpzSource(ImageSource):
    """An ADM-style .npz: `arr_0` uint8 [N, H, W, 3] read in batches straight from the zip member (a 50k
    x 256 x 256 file is 10 GB, so it is never loaded whole); `mu` / `sigma` if the file has them."""

    def __init__(self, path: str | os.PathLike, require_images: bool = True):
        what = "samples file" if require_images else "reference file"
        self.path = check_file(path, what, (".npz",))
        self.name = str(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as e:
            with open(self.path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            why = (
                "truncated or damaged: its zip archive cannot be read"
                if zipped
                else "numpy.savez writes a zip"
            )
            raise file_error(self.path, what, f"is not a readable .npz file ({why})", damaged=True) from e
        self.has_images = "arr_0" in self.members
        self.shape: tuple[int, ...] = ()
        if not self.has_images:
            if require_images:
                raise ClusterarError(
                    f"{self.path} has no 'arr_0' array (it has: {', '.join(sorted(self.members)) or 'nothing'}); "
                    "samples must be saved as numpy.savez(path, images) with images uint8 [N, H, W, 3]"
                )
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(self.members["arr_0"]) as f:
            self.shape, self.dtype, self.fortran = _npy_header(f, self.path)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] not in (1, 3) or self.fortran:
            raise ClusterarError(
                f"{self.path}: arr_0 is {self.dtype} {list(self.shape)}"
                + (" in Fortran order" if self.fortran else "")
                + "; expected uint8 [N, H, W, 3] (ADM format), e.g. numpy.savez(path, images.astype(numpy.uint8))"
            )
        if self.shape[0] == 0:
            raise ClusterarError(f"{self.path}: arr_0 holds no images")
        if "arr_1" in self.members:  # ADM's sample files: the class of each image
            self.labels_from = f"{self.path} arr_1"
            self.labels = check_labels(self._read_arr_1(what), self.shape[0], self.labels_from)

    def _read_arr_1(self, what: str) -> np.ndarray:
        """The labels array, never unpickled: an object array (or a damaged member) is refused in one line."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return z["arr_1"]
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ClusterarError(
                    f"{self.labels_from} is an array of pickled Python objects, which clusterar never loads; "
                    "save the class labels as integers, numpy.savez(path, images, labels.astype(numpy.int64))"
                ) from None
            raise file_error(self.path, what, f"has a damaged arr_1 ({first_line(e)})", damaged=True) from e
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise file_error(self.path, what, f"has a damaged arr_1 ({first_line(e)})", damaged=True) from e

    def __len__(self) -> int:
        return self.shape[0] if self.has_images else 0

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(self.members["arr_0"]) as f:
            _npy_header(f, self.path)
            for i in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - i)
                raw = f.read(n * per_image)
                if len(raw) != n * per_image:
                    raise ClusterarError(
                        f"{self.path}: arr_0 is truncated at image {i}; write the file again"
                    )
                arr = np.frombuffer(raw, np.uint8).reshape(n, *self.shape[1:])
                yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous()

    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The precomputed (mu, sigma) of an ADM reference batch, if the file has them."""
        if "mu" not in self.members or "sigma" not in self.members:
            return None
        with np.load(self.path, allow_pickle=False) as z:
            return z["mu"].astype(np.float64), z["sigma"].astype(np.float64)

    def identity(self) -> str:
        return "npz:" + _file_identity(self.path)


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    try:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise ClusterarError(f"{path}: arr_0 is not a valid .npy array inside the npz ({e})") from e
    return shape, dtype, fortran


class FolderSource(ImageSource):
    """Image files under a folder (recursively, sorted by path). All must have one size unless
    `image_size` is given, which resizes and centre-crops each like ADM / LlamaGen (`center_crop_arr`)."""

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        self.root = Path(path)
        self.name = str(path)
        self.image_size = image_size
        if is_symlink_loop(self.root):
            raise ClusterarError(
                f"image folder {self.root} is a symbolic link loop (following its links leads back to them)"
            )
        if not self.root.is_dir():
            raise ClusterarError(f"image folder not found: {self.root}")
        self.files = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        if not self.files:
            raise ClusterarError(
                f"{self.root} is a folder that holds no image files ({' '.join(sorted(IMAGE_EXTENSIONS))}), "
                "nor in sub-folders; pass a folder of images or an .npz such as the samples.npz of "
                "`clusterar sample`"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, p: Path) -> np.ndarray:
        try:
            if self.image_size is not None:
                return read_image(str(p), self.image_size)
            with Image.open(p) as img:
                img.load()
                return np.asarray(to_rgb(img))
        except Exception as e:  # any decoding failure is the file's problem: name it
            raise ClusterarError(
                f"cannot read image {p}: {type(e).__name__}: {e}; fix or delete the file"
            ) from e

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        first_shape = None
        for i in range(0, len(self.files), batch_size):
            arrs = []
            for p in self.files[i : i + batch_size]:
                a = self._read(p)
                if first_shape is None:
                    first_shape = a.shape
                elif a.shape != first_shape:
                    raise ClusterarError(
                        f"{p} is {a.shape[1]}x{a.shape[0]} but {self.files[0]} is "
                        f"{first_shape[1]}x{first_shape[0]}; pass an image size (--image-size) to resize "
                        "and centre-crop every image to one size"
                    )
                arrs.append(a)
            yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    def identity(self) -> str:
        h = hashlib.sha256(f"{self.root.resolve()}|{self.image_size}".encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return "folder:" + h.hexdigest()[:16]


def _parse_bundled(spec: str) -> tuple[str, str] | None:
    name, sep, split = spec.partition(":")
    if sep and name in CLASSIFIER_DATA and split in ("train", "val", "all"):
        return name, split
    return None


def open_images(
    images: str | os.PathLike | np.ndarray | torch.Tensor | ImageSource,
    image_size: int | None = None,
    require_images: bool = True,
) -> ImageSource:
    """An ImageSource for an array, "mnist:val"-style spec, .npz file or image folder."""
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, np.ndarray | torch.Tensor):
        return ArraySource(images)
    spec = os.fspath(images)
    bundled = _parse_bundled(spec)
    if bundled is not None:
        return BundledSource(*bundled)
    path = Path(spec[len("folder:") :] if spec.startswith("folder:") else spec).expanduser()
    if path.is_dir() or (is_symlink_loop(path) and path.suffix != ".npz"):
        return FolderSource(path, image_size)
    if path.suffix == ".npz":
        return NpzSource(path, require_images=require_images)
    if path.is_file():
        raise ClusterarError(f"{path} is neither an .npz file nor a folder of images")
    raise ClusterarError(
        f"unknown images or reference '{spec}': not an existing .npz file or folder, nor one of "
        "mnist:train, mnist:val, mnist:all, digits:train, digits:val, digits:all"
    )


def reference_dataset(reference: ImageSource) -> str | None:
    """The labelled dataset a reference belongs to: a bundled set, or for a folder reference PATH/val
    (any split name) of a dataset folder PATH with class sub-folders, or such a dataset folder itself."""
    if isinstance(reference, BundledSource):
        return reference.dataset
    if not isinstance(reference, FolderSource):
        return None
    root = reference.root.expanduser().resolve()
    has_classes = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if root.name in SPLIT_NAMES and (root.parent / "train").is_dir() and has_classes:
        return f"folder:{root.parent}"
    if (root / "train").is_dir() or (has_classes and root.name not in SPLIT_NAMES):
        return f"folder:{root}"
    return None
