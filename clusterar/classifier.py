"""A small CNN classifier: the feature extractor of FID / IS / precision-recall without downloaded weights.

Inception-v3 features mean little on 32x32 grey digits, and many machines cannot download Inception's
weights at all. So for any dataset with classes (the bundled `mnist` / `digits`, and `folder:PATH` image
folders) the metrics can use a small CNN trained on the TRAIN split of the same dataset: its penultimate
activations (128-d) stand in for Inception's pool features (FID, precision/recall) and its softmax for
Inception's class probabilities (IS at most the number of classes; class accuracy of conditional
samples). The usual "MNIST FID" recipe, generalised. Its scores compare runs on the same data with the
same classifier; they are not on the scale of published Inception FIDs.

The classifier is trained once (a fixed seed, on the CPU: seconds for the bundled sets), then cached:
`<cache>/classifier-<dataset>-<fingerprint>.safetensors`, with the settings and the content hash of the
weights in its JSON header. The fingerprint covers everything that decides the weights (dataset, the
folder's file list with sizes and modification times, split, architecture, seed, training settings), so
changed data or settings give a new file; a cache hit is checked (settings and weight hash) and a file
that does not match is retrained and replaced, with a warning. The cache folder is `cache_dir`, else
$CLUSTERAR_CACHE, else ~/.cache/clusterar.

Held-out accuracy: on the dataset's val split (a folder's `val/`, or a stratified tenth of its images
when it has no split folders). It is recorded with every metric, and a warning says when it is below
LOW_ACCURACY: features of a classifier that cannot tell the classes apart say little about the images.

Images are accepted as uint8 [N, H, W, 3] (sampler / npz), [N, 3, H, W], [N, 1, H, W] or [N, H, W],
and converted in one way for both samples and references: grey models take the mean of the colour
channels (exact for grey stored as RGB), colour models grey images repeated to 3 channels; scaled to
[-1, 1] and resized (bilinear, antialiased) to the input size if needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import load_dataset, stratified_split
from .errors import ClusterarError
from .fileio import fingerprint, load_tensors, read_meta, save_tensors

log = logging.getLogger("clusterar.classifier")

CLASSIFIER_DATA = ("mnist", "digits")  # bundled; any folder:PATH with class sub-folders works too
INPUT_SIZE = 32  # default input size; images of other sizes are resized to it
FORMAT_VERSION = 1  # bump when the training code changes the weights for the same settings
LOW_ACCURACY = 0.8  # held-out accuracy below which the metrics get a warning


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path`, else $CLUSTERAR_CACHE, else ~/.cache/clusterar."""
    if path is None:
        path = os.environ.get("CLUSTERAR_CACHE") or Path.home() / ".cache" / "clusterar"
    return Path(path).expanduser()


# ----------------------------------------------------------------------------------------------------
# image conversion (shared with clusterar.metrics)


def to_nchw_uint8(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    """uint8 [N, H, W, C], [N, C, H, W] (C = 1 or 3) or [N, H, W] -> uint8 tensor [N, C, H, W].

    A 4-d array whose last axis has 1 or 3 entries and whose second has not is channels-last (the npz /
    sampler layout); otherwise the second axis must be the channels.
    """
    t = torch.from_numpy(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8:
        raise ClusterarError(
            f"{what} must be uint8 pixels 0..255, got dtype {t.dtype}; convert floats in [-1, 1] with "
            "clusterar.data.to_uint8 (or (x * 255).round().clip(0, 255).astype(uint8) for [0, 1])"
        )
    if t.ndim == 3:
        t = t[:, None]
    elif t.ndim == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] not in (1, 3) or t.shape[0] == 0 or min(t.shape[2:]) < 8:
        raise ClusterarError(
            f"{what} have shape {list(t.shape)}; expected a non-empty batch [N, H, W, 3] (as in ADM npz "
            "files), [N, 3, H, W], [N, 1, H, W] or [N, H, W] with H, W >= 8"
        )
    return t.contiguous()


def to_classifier_input(images: torch.Tensor, channels: int = 1, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, channels, size, size] in [-1, 1]: channel mean for grey models,
    grey repeated for colour ones, then resize if needed."""
    x = images.float()
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x / 127.5 - 1.0
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


# ----------------------------------------------------------------------------------------------------
# the network


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that decides the weights; its JSON is hashed into the cache file name."""

    dataset: str = "mnist"  # mnist, digits or folder:PATH
    split: str = "train"
    data_fingerprint: str = ""  # folders: their file list, sizes and times (see data_fingerprint)
    channels: int = 1  # 1: grey (the bundled digits), 3: colour (folders)
    input_size: int = INPUT_SIZE
    max_images: int = 50_000  # train images used at most (class-balanced), so huge folders stay cheap
    width: int = 16  # channels of the first block; then 2x, 4x, 4x
    feature_dim: int = 128  # penultimate (feature) layer
    num_classes: int = 10
    seed: int = 0
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    augment: bool = True  # random affine: +-10 degrees, scale 0.9..1.1, shift +-2 px
    version: int = FORMAT_VERSION

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitClassifier(nn.Module):
    """Four conv blocks (32 -> 16 -> 8 -> 4 px at the default size), global average pool, a 128-d
    feature layer, logits."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        w = config.width
        self.config = config
        self.body = nn.Sequential(
            _block(config.channels, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature = nn.Sequential(nn.Linear(4 * w, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [B, channels, S, S] in [-1, 1] -> (features [B, feature_dim], logits [B, classes])."""
        f = self.feature(self.body(x))
        return f, self.head(f)


# ----------------------------------------------------------------------------------------------------
# training


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random small affine transforms (background -1 stays -1): the usual MNIST regulariser."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(10)
    inv_scale = 1.0 / (1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / (x.shape[-1] / 2))  # +-2 px in [-1, 1] units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) * inv_scale
    theta[:, 0, 1] = -torch.sin(ang) * inv_scale
    theta[:, 1, 0] = torch.sin(ang) * inv_scale
    theta[:, 1, 1] = torch.cos(ang) * inv_scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Top-1 accuracy on uint8 images [N, C, H, W]."""
    model.eval()
    c = model.config
    correct = 0
    for i in range(0, len(images), batch_size):
        _, logits = model(to_classifier_input(images[i : i + batch_size], c.channels, c.input_size))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def _images(dataset, idx: np.ndarray, progress: bool, desc: str) -> torch.Tensor:
    """uint8 [n, C, S, S] of the rows `idx` of an ImageDataset (folders are read here, once)."""
    if dataset.images is not None:
        return dataset.images[torch.from_numpy(idx)]
    out = [dataset[int(i)][0] for i in tqdm(idx, desc=desc, unit="img", disable=not progress, leave=False)]
    return torch.stack(out)


def _balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """All indices if there are at most `limit`, else `limit` of them spread evenly over the classes."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, limit // len(classes))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]))


def load_splits(
    config: ClassifierConfig, progress: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "val": (images, labels)} at the classifier's input size. A folder
    without split folders gives a stratified tenth of its images to val (the bundled sets' rule)."""
    train = load_dataset(config.dataset, config.split, config.input_size)
    val = load_dataset(config.dataset, "val", config.input_size) if config.split != "val" else train
    train_idx = np.arange(len(train))
    val_idx = np.arange(len(val))
    if train.root is not None and train.root == val.root:  # one folder: hold a tenth out
        labels = train.labels.numpy()
        train_idx, val_idx = stratified_split(labels, "train"), stratified_split(labels, "val")
    train_idx = train_idx[_balanced_subset(train.labels.numpy()[train_idx], config.max_images, config.seed)]
    val_idx = val_idx[_balanced_subset(val.labels.numpy()[val_idx], config.max_images // 5, config.seed)]
    return {
        "train": (_images(train, train_idx, progress, "reading train images"), train.labels[train_idx]),
        "val": (_images(val, val_idx, progress, "reading val images"), val.labels[val_idx]),
    }


def data_fingerprint(dataset: str) -> str:
    """What identifies a folder's images cheaply: every file's relative path, size and modification time
    (train and val splits); "" for the bundled sets, whose content never changes."""
    if not dataset.startswith("folder:"):
        return ""
    h = hashlib.sha256()
    root = Path(dataset[len("folder:") :]).expanduser()
    for split in ("train", "val"):
        try:
            d = load_dataset(dataset, split, INPUT_SIZE)
        except ClusterarError:
            if split == "val":
                continue
            raise
        for i in range(len(d)):
            path = d.path(i)
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def train_classifier(config: ClassifierConfig, progress: bool = True) -> tuple[DigitClassifier, dict]:
    """Train on the CPU from the seed; returns the model (eval mode) and stats (val accuracy, seconds)."""
    if config.dataset not in CLASSIFIER_DATA and not config.dataset.startswith("folder:"):
        raise ClusterarError(
            f"the classifier extractor knows the bundled datasets {', '.join(CLASSIFIER_DATA)} and "
            f"folder:PATH image folders with class sub-folders, not '{config.dataset}'"
        )
    splits = load_splits(config, progress)
    (train_images, y_all), (val_images, val_labels) = splits["train"], splits["val"]
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    model = DigitClassifier(config)
    x_all = to_classifier_input(train_images, config.channels, config.input_size)
    steps_per_epoch = math.ceil(len(x_all) / config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    start = time.perf_counter()
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc=f"training the {config.dataset} classifier (once, then cached)",
        disable=not progress,
        unit="step",
    )
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(x_all), config.batch_size):
            idx = perm[i : i + config.batch_size]
            x = _augment(x_all[idx], g) if config.augment else x_all[idx]
            loss = F.cross_entropy(model(x)[1], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    stats = {
        "val_accuracy": accuracy(model, val_images, val_labels),
        "train_accuracy": accuracy(model, train_images, y_all),
        "train_seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "n_train": len(train_images),
        "n_val": len(val_images),
    }
    return model, stats


# ----------------------------------------------------------------------------------------------------
# the cache


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """fileio.fingerprint of the weights, 0-d tensors (BatchNorm's step counters) taken as 1-d."""
    return fingerprint({k: v.reshape(-1) if v.ndim == 0 else v for k, v in tensors.items()})


def classifier_path(config: ClassifierConfig, cache: str | os.PathLike | None = None) -> Path:
    name = config.dataset
    if name.startswith("folder:"):  # a readable slug: folder-<last path part>
        name = (
            "folder-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name[len("folder:") :]).expanduser().name)[:40]
        )
    return cache_dir(cache) / f"classifier-{name}-{config.fingerprint()}.safetensors"


def _check_cached(path: Path, config: ClassifierConfig) -> str | None:
    """None if `path` holds the classifier for `config` intact, else why not."""
    try:
        meta = read_meta(path, "cached classifier")
    except ClusterarError as e:
        return str(e)
    if meta.get("config") != asdict(config):
        return "its settings differ"
    tensors, _ = load_tensors(path, "cached classifier")
    if weights_fingerprint(tensors) != meta.get("weights_fingerprint"):
        return "its weights do not match their recorded hash (corrupt file)"
    return None


def load_classifier(
    dataset: str = "mnist",
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides,
) -> tuple[DigitClassifier, dict]:
    """The cached classifier for `dataset` (training it on first use); returns (model, meta).

    `dataset`: mnist, digits or folder:PATH (class sub-folders, optionally under train/ and val/).
    `overrides` change ClassifierConfig fields (e.g. epochs=2 in tests); they are part of the fingerprint.
    meta holds the config, val accuracy, training time and the weight hash.
    """
    if dataset not in CLASSIFIER_DATA and not dataset.startswith("folder:"):
        raise ClusterarError(
            f"no classifier for dataset '{dataset}'; use one of {', '.join(CLASSIFIER_DATA)} or "
            "folder:PATH (an image folder with one sub-folder per class), or pass an Inception-v3 weights "
            "file (--inception PATH)"
        )
    if dataset.startswith("folder:"):
        probe = load_dataset(dataset, "train", INPUT_SIZE)
        overrides = {
            "channels": 3,
            "num_classes": probe.num_classes,
            "data_fingerprint": data_fingerprint(dataset),
            **overrides,
        }
    try:
        config = ClassifierConfig(dataset=dataset, **overrides)
    except TypeError as e:
        raise ClusterarError(f"unknown classifier setting: {e}") from e
    path = classifier_path(config, cache)
    if path.exists():
        why = _check_cached(path, config)
        if why is None:
            tensors, meta = load_tensors(path, "cached classifier")
            model = DigitClassifier(config)
            model.load_state_dict(tensors, strict=True)
            log.info("classifier cache hit: %s", path)
            _warn_if_weak(meta)
            return model.eval(), meta
        log.warning("cached classifier %s is not usable (%s); training it again", path, why)
    model, stats = train_classifier(config, progress=progress)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {
        "kind": "clusterar-digit-classifier",
        "config": asdict(config),
        "fingerprint": config.fingerprint(),
        "weights_fingerprint": weights_fingerprint(tensors),
        **stats,
    }
    save_tensors(path, tensors, meta)
    log.info(
        "trained the %s classifier in %.1f s: val accuracy %.4f; cached at %s",
        dataset,
        stats["train_seconds"],
        stats["val_accuracy"],
        path,
    )
    _warn_if_weak(meta)
    return model, meta


def _warn_if_weak(meta: dict) -> None:
    acc, cfg = meta["val_accuracy"], meta["config"]
    if acc < LOW_ACCURACY:
        log.warning(
            "the %s classifier reads only %.1f%% of held-out images correctly (%d classes, %d train images): "
            "its FID, precision/recall and class accuracy say little about the images; give it more train "
            "images per class, or use Inception-v3 (--inception PATH)",
            cfg["dataset"],
            100 * acc,
            cfg["num_classes"],
            meta.get("n_train", 0),
        )


__all__ = [
    "CLASSIFIER_DATA",
    "ClassifierConfig",
    "DigitClassifier",
    "accuracy",
    "cache_dir",
    "LOW_ACCURACY",
    "classifier_path",
    "data_fingerprint",
    "load_splits",
    "load_classifier",
    "to_classifier_input",
    "to_nchw_uint8",
    "train_classifier",
]
