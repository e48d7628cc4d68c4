"""FID, Inception Score and precision/recall of generated images, in PyTorch (no TensorFlow).

The metrics follow the ADM evaluator (guided-diffusion/evaluations), which the field reports:

- FID: Frechet distance between Gaussians fitted to the features of the samples and of a reference set.
  Computed in float64 without a general matrix square root: tr(sqrt(S1 S2)) is the sum of the singular
  values of sqrt(S1) sqrt(S2) (symmetric square roots by eigh), so singular covariances (fewer images
  than feature dimensions) need no epsilon and no complex parts appear.
- Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over splits of 5,000 images as ADM does.
- Precision / recall: Kynkaenniemi et al. (2019), k-nearest-neighbour manifolds with k = 3. A sample is
  "precise" if it lies within the k-NN radius of some reference image; a reference image is "recalled"
  if it lies within the k-NN radius of some sample. Squared distances, computed in row x column blocks,
  so 50k x 50k never has to fit in memory.

Feature extractors:

- `ClassifierExtractor` (default for the bundled data): the small digit CNN of clusterar.classifier,
  trained on the TRAIN split of mnist / digits; penultimate features and softmax.
- `Inception(path)`: Inception-v3 with the standard FID weights pt_inception-2015-12-05-6726825d.pth
  that the user supplies (nothing is downloaded), run by the optional package torch-fidelity
  (`pip install "clusterar[inception]"`): 2048-d pool features, 1008-way unbiased logits for IS, as ADM.

Images: an array / tensor in memory, an ADM-style .npz (`arr_0` uint8 [N, H, W, 3], streamed in batches),
or a folder of image files. References: "mnist:val" (also :train, :all; likewise "digits:..."), an npz
(ADM reference batches hold `arr_0` images and precomputed Inception `mu` / `sigma`; FID then uses the
stored statistics as ADM does, precision/recall the images), or an image folder. Reference statistics
are computed once and cached next to the classifier, keyed by the extractor's fingerprint and the
reference's identity (content hash for bundled data; path, size and modification time for files).

Features are computed in float32 with TF32 off (also on CUDA): metric differences should come from the
images, not from the arithmetic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .classifier import (
    CLASSIFIER_DATA,
    cache_dir,
    load_classifier,
    to_classifier_input,
    to_nchw_uint8,
)
from .errors import ClusterarError
from .fileio import check_file, file_error, fingerprint, load_tensors, save_tensors
from .runtime import pick_device

log = logging.getLogger("clusterar.metrics")

IS_SPLIT_SIZE = 5000  # ADM's split size for the Inception Score
STANDARD_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_INCEPTION_SHA256 = "6726825d"  # torch.hub convention: the file name carries its hash prefix
INCEPTION_INSTALL = (
    'pip install "clusterar[inception]" (torch-fidelity; it needs a torchvision built for your torch, '
    "e.g. torch==2.13.0 with torchvision==0.28.0, both from the same index)"
)


# ----------------------------------------------------------------------------------------------------
# the metrics on features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, rowvar=False, N-1 normalisation as numpy.cov / ADM)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ClusterarError(f"need at least 2 feature vectors [N, D] for statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with round-off removed: those below the numerical rank
    tolerance (as numpy.linalg.matrix_rank) set to 0. sqrt magnifies noise near 0 (sqrt(1e-16) = 1e-8)."""
    tol = max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_psd_eigvals(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64.

    S1 S2 is similar to the symmetric PSD S1^(1/2) S2 S1^(1/2), so tr(sqrt(S1 S2)) is the sum of the
    singular values of S1^(1/2) S2^(1/2) (square roots by eigh): no complex round-off (which
    scipy.linalg.sqrtm on S1 S2 produces and the reference implementations discard) and no epsilon for
    singular covariances (fewer images than feature dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ClusterarError(
            f"Frechet distance needs means [D] and covariances [D, D] of one D; got {mu1.shape}, "
            f"{s1.shape}, {mu2.shape}, {s2.shape} (features of different extractors?)"
        )
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ClusterarError("Frechet distance: the statistics contain NaN or inf (broken features)")
    # sqrt(S1) S2 sqrt(S1) = B B^T with B = sqrt(S1) sqrt(S2): the trace of its square root is the sum of
    # B's singular values, which SVD gets without squaring the condition number (as eig(B B^T) would)
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(probs: np.ndarray | torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts of exp(mean_x KL(p(y|x) || p(y))); probs [N, classes].

    Confident predictions spread evenly over C classes give C; a single class gives 1.
    """
    from scipy.special import rel_entr

    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0 or not np.isfinite(p).all() or (p < 0).any():
        raise ClusterarError(f"inception_score needs finite probabilities [N, classes], got shape {p.shape}")
    if not np.allclose(p.sum(1), 1, atol=1e-3):
        raise ClusterarError("inception_score needs probabilities (rows summing to 1), e.g. softmax(logits)")
    if not 1 <= splits <= len(p):
        raise ClusterarError(f"splits must be between 1 and the number of images ({len(p)}), got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        kl = rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] (|a|^2 - 2ab + |b|^2, clamped at 0, as ADM)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, block: int = 4096) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    n = len(features)
    if not 1 <= k < n:
        raise ClusterarError(f"k-NN radii need 1 <= k < number of feature vectors ({n}), got k={k}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0 : r0 + block]
        best = None
        for c0 in range(0, n, block):
            d = _sq_dists(rows, features[c0 : c0 + block])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0 : r0 + block] = best[:, k]  # index 0 is the point itself (distance 0)
    return radii


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = 3,
    block: int = 4096,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of fake vs real features, Kynkaenniemi et al. 2019 with k-NN manifolds.

    precision: share of fakes within the k-NN radius of at least one real point; recall: share of reals
    within the k-NN radius of at least one fake. Memory is O(block^2) whatever the set sizes.
    """
    real, fake = (
        x.detach().to(device=device, dtype=torch.float32)
        if isinstance(x, torch.Tensor)
        else torch.as_tensor(np.asarray(x, np.float32), device=device)
        for x in (real_features, fake_features)
    )
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ClusterarError(
            f"precision/recall need features [N, D] of one D, got {list(real.shape)} and {list(fake.shape)}"
        )
    real_r, fake_r = manifold_radii(real, k, block), manifold_radii(fake, k, block)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for f0 in range(0, len(fake), block):
        for r0 in range(0, len(real), block):
            d = _sq_dists(fake[f0 : f0 + block], real[r0 : r0 + block])
            fake_in[f0 : f0 + block] |= (d <= real_r[None, r0 : r0 + block]).any(dim=1)
            real_in[r0 : r0 + block] |= (d <= fake_r[f0 : f0 + block, None]).any(dim=0)
    return int(fake_in.sum()) / len(fake), int(real_in.sum()) / len(real)


# ----------------------------------------------------------------------------------------------------
# image sources: arrays, npz files (streamed), folders, bundled datasets


class ImageSource:
    """uint8 images yielded in batches as [B, C, H, W] tensors, with an identity for caching, and the
    class each image was made for when the source knows it (an ADM npz's arr_1)."""

    name: str
    labels: np.ndarray | None = None

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

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.images), batch_size):
            yield self.images[i : i + batch_size]


class BundledSource(ArraySource):
    def __init__(self, dataset: str, split: str):
        from .data import load_dataset

        data = load_dataset(dataset, split, 32)
        super().__init__(data.images, f"{dataset}:{split}", labels=data.labels)
        self.dataset, self.split = dataset, split

    def identity(self) -> str:
        return f"{self.name}:{fingerprint(self.images)}"


def check_labels(labels: Any, n: int, where: str) -> np.ndarray:
    """Class ids [n] as int64, or a clear error."""
    arr = np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and arr.min() < 0):
        raise ClusterarError(
            f"{where}: class labels must be {n} non-negative integers (one per image), got {arr.dtype} "
            f"{list(arr.shape)}"
        )
    return arr.astype(np.int64)


def class_accuracy(probs: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """The share of images whose most likely class is the one they were conditioned on."""
    probs = torch.as_tensor(probs)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if probs.ndim != 2 or len(probs) != len(labels_t) or len(labels_t) == 0:
        raise ClusterarError(
            f"class accuracy needs probabilities [N, C] and N labels, got {tuple(probs.shape)} and {len(labels_t)}"
        )
    if int(labels_t.max()) >= probs.shape[1]:
        raise ClusterarError(
            f"a label ({int(labels_t.max())}) is outside the classifier's {probs.shape[1]} classes"
        )
    return float((probs.argmax(1) == labels_t).double().mean())


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
            with np.load(self.path, allow_pickle=False) as z:
                self.labels = check_labels(z["arr_1"], self.shape[0], f"{self.path} arr_1")

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
        from .data import IMAGE_EXTENSIONS

        self.root = Path(path)
        self.name = str(path)
        self.image_size = image_size
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
        from PIL import Image

        from .data import _to_rgb, read_image

        try:
            if self.image_size is not None:
                return read_image(str(p), self.image_size)
            with Image.open(p) as img:
                img.load()
                return np.asarray(_to_rgb(img))
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
    if path.is_dir():
        return FolderSource(path, image_size)
    if path.suffix == ".npz":
        return NpzSource(path, require_images=require_images)
    if path.is_file():
        raise ClusterarError(f"{path} is neither an .npz file nor a folder of images")
    raise ClusterarError(
        f"unknown images or reference '{spec}': not an existing .npz file or folder, nor one of "
        "mnist:train, mnist:val, mnist:all, digits:train, digits:val, digits:all"
    )


# ----------------------------------------------------------------------------------------------------
# feature extractors


@contextlib.contextmanager
def _full_fp32():
    """TF32 off inside (cuDNN convolutions use it by default on Ampere and later)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


class FeatureExtractor:
    """features + class probabilities of uint8 images; `fingerprint` identifies the network exactly."""

    name: str
    fingerprint: str
    device: torch.device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, C, H, W] on the CPU -> (features [B, D], logits [B, classes]) as float32."""
        raise NotImplementedError

    @torch.no_grad()
    def extract(
        self, source: ImageSource, batch_size: int = 256, progress: bool = True, desc: str = "features"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 [N, D], probabilities float64 [N, classes]) of every image of `source`."""
        feats, probs = [], []
        with _full_fp32(), tqdm(total=len(source), desc=desc, unit="img", disable=not progress) as bar:
            for batch in source.batches(batch_size):
                f, logits = self.forward(to_nchw_uint8(batch, source.name))
                feats.append(f.float().cpu().numpy())
                probs.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(feats), np.concatenate(probs)


class ClassifierExtractor(FeatureExtractor):
    """The cached classifier of `dataset` (mnist, digits or folder:PATH; see clusterar.classifier): 128-d
    features, a softmax over the dataset's classes."""

    def __init__(
        self,
        dataset: str = "mnist",
        cache: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        progress: bool = True,
        **overrides: Any,
    ):
        self.model, self.meta = load_classifier(dataset, cache, progress=progress, **overrides)
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model.to(self.device)
        self.name = f"classifier:{dataset}"
        self.fingerprint = (
            f"classifier-{dataset}-{self.meta['fingerprint']}-{self.meta['weights_fingerprint']}"
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.model.config
        return self.model(to_classifier_input(images, c.channels, c.input_size).to(self.device))


def _import_fidelity():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # ImportError, or torchvision failing against this torch (RuntimeError)
        raise ClusterarError(
            f"Inception-v3 features need the optional package torch-fidelity, which could not be imported "
            f"({type(e).__name__}: {e}). Install it with: {INCEPTION_INSTALL}. Without it, evaluate "
            "bundled-data samples with the classifier extractor (the default for --ref mnist:val)"
        ) from e
    return FeatureExtractorInceptionV3


class Inception(FeatureExtractor):
    """Inception-v3 with the FID weights from a local file, via torch-fidelity (TF-exact resize to 299).

    The file is read with torch.load(weights_only=True) here; torch-fidelity is then handed the checked
    tensors re-serialised in memory, so the user's file is never unpickled freely.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto"):
        from .checkpoints import load_torch_weights

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ClusterarError(
                f"Inception weights file not found: {self.path}. Pass the standard FID weights "
                f"{STANDARD_INCEPTION} (from the pytorch-fid / torch-fidelity releases); nothing is downloaded"
            )
        fidelity_cls = _import_fidelity()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if not digest.startswith(STANDARD_INCEPTION_SHA256):
            log.warning(
                "%s is not the standard %s (sha256 %s...); its FIDs are not comparable to published ones",
                self.path,
                STANDARD_INCEPTION,
                digest[:8],
            )
        state = load_torch_weights(self.path, what="Inception weights file")
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            model = fidelity_cls(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buf
            )
        except RuntimeError as e:  # strict load_state_dict: missing / unexpected keys, wrong shapes
            raise ClusterarError(
                f"{self.path} does not hold Inception-v3 FID weights ({STANDARD_INCEPTION}): {e}"
            ) from e
        self.device = pick_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.name = "inception-v3"
        self.fingerprint = f"inception-{digest[:16]}"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        feats, logits = self.model(images.to(self.device))
        return feats, logits


def make_extractor(
    extractor: str | FeatureExtractor | None,
    reference: ImageSource,
    cache: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> FeatureExtractor:
    """None or "classifier": the classifier of the reference's dataset (a bundled set, or the folder
    dataset whose split the reference folder is); "classifier:DATA" (mnist, digits, folder:PATH);
    "inception:PATH"; or an instance."""
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if extractor is None or extractor == "classifier":
        data = reference_dataset(reference)
        if data is None:
            raise ClusterarError(
                f"choose a feature extractor for reference {reference.name}: --extractor "
                "classifier:folder:PATH (a classifier trained on the labelled image folder PATH, which has "
                f"one sub-folder per class, no download), or an Inception-v3 weights file (--inception "
                f"{STANDARD_INCEPTION})"
            )
        return ClassifierExtractor(data, cache, device, progress)
    if extractor.startswith("classifier:"):
        return ClassifierExtractor(extractor.partition(":")[2], cache, device, progress)
    if extractor.startswith("inception:"):
        return Inception(extractor.partition(":")[2], device)
    raise ClusterarError(
        f"unknown extractor '{extractor}'; use classifier, classifier:mnist, classifier:digits, "
        "classifier:folder:PATH or inception:PATH"
    )


def reference_dataset(reference: ImageSource) -> str | None:
    """The labelled dataset a reference belongs to: a bundled set, or for a folder reference PATH/val
    (any split name) of a dataset folder PATH with class sub-folders, or such a dataset folder itself."""
    from .data import SPLIT_NAMES

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


# ----------------------------------------------------------------------------------------------------
# reference statistics (cached) and the evaluation


@dataclass
class ReferenceStats:
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    features: np.ndarray | None  # float32 [N, D] for precision/recall (None: stats-only npz)
    n: int
    name: str
    stats_from: str  # "features" or "npz mu/sigma"


def reference_statistics(
    reference: str | os.PathLike | np.ndarray | torch.Tensor | ImageSource,
    extractor: FeatureExtractor,
    cache: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = True,
    image_size: int | None = None,
) -> ReferenceStats:
    """mu, sigma and features of the reference, computed once per (extractor, reference) and cached."""
    source = open_images(reference, image_size, require_images=False)
    stored = source.stats() if isinstance(source, NpzSource) else None
    if stored is not None and stored[0].shape != (_feature_dim(extractor),):
        log.warning(
            "%s: its stored mu/sigma have %d dimensions, %s features %d; computing statistics from arr_0",
            source.name,
            stored[0].shape[0],
            extractor.name,
            _feature_dim(extractor),
        )
        stored = None
    if isinstance(source, NpzSource) and not source.has_images:
        if stored is None:
            raise ClusterarError(
                f"reference {source.name} has neither arr_0 images nor mu/sigma of {extractor.name} "
                f"features (it has: {', '.join(sorted(source.members)) or 'nothing'})"
            )
        return ReferenceStats(stored[0], stored[1], None, 0, source.name, "npz mu/sigma")

    identity = source.identity()
    path = None
    if identity is not None:
        key = hashlib.sha256(f"{extractor.fingerprint}|{identity}".encode()).hexdigest()[:16]
        path = cache_dir(cache) / f"refstats-{key}.safetensors"
        if path.exists():
            try:
                tensors, meta = load_tensors(path, "cached reference statistics")
            except ClusterarError as e:  # truncated or foreign file: the cache is ours to rewrite
                tensors, meta = {}, {"error": str(e)}
            if meta.get("extractor") == extractor.fingerprint and meta.get("reference") == identity:
                log.info("reference statistics cache hit: %s", path)
                return _ref_from(tensors, source, stored)
            log.warning("cached reference statistics %s do not match (%s); recomputing", path, meta)
    feats, _ = extractor.extract(source, batch_size, progress, desc=f"reference {source.name}")
    mu, sigma = feature_statistics(feats)
    tensors = {
        "mu": torch.from_numpy(mu),
        "sigma": torch.from_numpy(sigma),
        "features": torch.from_numpy(feats),
    }
    if path is not None:
        save_tensors(
            path, tensors, {"extractor": extractor.fingerprint, "reference": identity, "name": source.name}
        )
    return _ref_from(tensors, source, stored)


def _ref_from(tensors: dict[str, torch.Tensor], source: ImageSource, stored) -> ReferenceStats:
    feats = tensors["features"].numpy()
    if stored is not None:  # ADM: FID against the reference batch's own statistics
        return ReferenceStats(stored[0], stored[1], feats, len(feats), source.name, "npz mu/sigma")
    return ReferenceStats(
        tensors["mu"].numpy(), tensors["sigma"].numpy(), feats, len(feats), source.name, "features"
    )


def _feature_dim(extractor: FeatureExtractor) -> int:
    if isinstance(extractor, ClassifierExtractor):
        return extractor.model.config.feature_dim
    return 2048


def evaluate_images(
    images: str | os.PathLike | np.ndarray | torch.Tensor | ImageSource,
    reference: str | os.PathLike | np.ndarray | torch.Tensor | ImageSource = "mnist:val",
    extractor: str | FeatureExtractor | None = None,
    k: int = 3,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    image_size: int | None = None,
    is_splits: int | None = None,
    labels: Any = None,
) -> dict[str, Any]:
    """FID, Inception Score, precision and recall of `images` against `reference`, and the class
    accuracy of conditional samples.

    images: uint8 array/tensor ([N, H, W, 3], [N, C, H, W], ...), an .npz (arr_0) or a folder.
    reference: "mnist:val" (etc.), an .npz (ADM reference batch) or a folder, or an array.
    extractor: None (the classifier of a bundled reference), "classifier[:DATA]", "inception:PATH",
    or a FeatureExtractor such as Inception(path) or ClassifierExtractor("digits", epochs=2).
    is_splits: splits for the Inception Score (default: one per 5,000 images, as ADM).
    labels: the class each image was conditioned on (default: an npz's arr_1). With a classifier extractor
    (whose classes are the dataset's) `class_accuracy` is the classifier's top-1 agreement with them:
    whether the samples show what was asked for, which FID does not say. The classifier's own held-out
    accuracy is reported beside it (`extractor_val_accuracy`) as its ceiling.
    """
    if batch_size < 1 or k < 1 or (image_size is not None and image_size < 1):
        raise ClusterarError(
            f"--batch-size, --k and --image-size must be at least 1, got {batch_size}, {k} and {image_size}"
        )
    samples = open_images(images, image_size)
    if labels is not None:
        samples.labels = check_labels(labels, len(samples), "labels")
    ref_source = open_images(reference, image_size, require_images=False)
    ext = make_extractor(extractor, ref_source, cache, device, progress)
    ref = reference_statistics(ref_source, ext, cache, batch_size, progress, image_size)
    feats, probs = ext.extract(samples, batch_size, progress, desc=f"samples {samples.name}")
    if len(feats) < 2:
        raise ClusterarError(f"{samples.name}: need at least 2 images for FID, got {len(feats)}")
    mu, sigma = feature_statistics(feats)
    splits = is_splits or max(1, len(feats) // IS_SPLIT_SIZE)
    is_mean, is_std = inception_score(probs, splits)
    precision = recall = None
    if ref.features is not None:
        if min(len(feats), len(ref.features)) <= k:
            raise ClusterarError(
                f"precision/recall with k={k} need more than {k} images in each set "
                f"(samples {len(feats)}, reference {len(ref.features)})"
            )
        precision, recall = precision_recall(ref.features, feats, k, device=ext.device)
    else:
        log.warning("reference %s holds only mu/sigma: precision and recall are not computed", ref.name)
    class_acc = None
    if samples.labels is not None and isinstance(ext, ClassifierExtractor):
        class_acc = class_accuracy(probs, samples.labels)
    return {
        "class_accuracy": class_acc,
        "extractor_val_accuracy": getattr(ext, "meta", {}).get("val_accuracy"),
        "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": splits,
        "precision": precision,
        "recall": recall,
        "k": k,
        "n_samples": len(feats),
        "n_reference": ref.n,
        "samples": samples.name,
        "reference": ref.name,
        "reference_stats": ref.stats_from,
        "extractor": ext.name,
        "extractor_fingerprint": ext.fingerprint,
    }


def format_table(metrics: dict[str, Any]) -> str:
    """The few lines `clusterar evaluate` prints."""

    def num(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    rows = [
        ("FID", num(metrics["fid"], ".3f")),
        (
            "Inception Score",
            f"{num(metrics['inception_score'], '.3f')} +- {num(metrics['inception_score_std'], '.3f')}",
        ),
        (f"precision (k={metrics['k']})", num(metrics["precision"], ".4f")),
        (f"recall (k={metrics['k']})", num(metrics["recall"], ".4f")),
        (
            "class accuracy",
            f"{num(metrics.get('class_accuracy'), '.4f')} (the classifier reads real val images at "
            f"{num(metrics.get('extractor_val_accuracy'), '.4f')})"
            if metrics.get("class_accuracy") is not None
            else "n/a (needs labels, e.g. an npz's arr_1, and a classifier extractor)",
        ),
        ("samples", f"{metrics['n_samples']} from {metrics['samples']}"),
        ("reference", f"{metrics['n_reference']} from {metrics['reference']} ({metrics['reference_stats']})"),
        ("extractor", f"{metrics['extractor']} ({metrics['extractor_fingerprint']})"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


__all__ = [
    "ArraySource",
    "BundledSource",
    "ClassifierExtractor",
    "FeatureExtractor",
    "FolderSource",
    "ImageSource",
    "Inception",
    "NpzSource",
    "ReferenceStats",
    "class_accuracy",
    "evaluate_images",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "inception_score",
    "make_extractor",
    "manifold_radii",
    "open_images",
    "precision_recall",
    "reference_dataset",
    "reference_statistics",
]
