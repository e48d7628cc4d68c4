"""Feature extractors: features and class probabilities of uint8 images, with a fingerprint that names
the network exactly (it keys the reference-statistics cache).

- `ClassifierExtractor` (default for the bundled data): the small digit CNN of clusterar.classifier,
  trained on the TRAIN split of mnist / digits; penultimate features and softmax.
- `Inception(path)`: Inception-v3 with the standard FID weights pt_inception-2015-12-05-6726825d.pth
  that the user supplies (nothing is downloaded), run by the optional package torch-fidelity
  (`pip install "clusterar[inception]"`): 2048-d pool features, 1008-way unbiased logits for IS, as ADM.

Features are computed in float32 with TF32 off (also on CUDA): metric differences should come from the
images, not from the arithmetic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoints import load_torch_weights
from ..classifier import load_classifier, to_classifier_input, to_nchw_uint8
from ..errors import ClusterarError
from ..runtime import pick_device
from .sources import ImageSource, reference_dataset

log = logging.getLogger("clusterar.metrics")

STANDARD_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_INCEPTION_SHA256 = "6726825d"  # torch.hub convention: the file name carries its hash prefix
INCEPTION_INSTALL = (
    'pip install "clusterar[inception]" (torch-fidelity; it needs a torchvision built for your torch, '
    "e.g. torch==2.13.0 with torchvision==0.28.0, both from the same index)"
)


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


def feature_dim(extractor: FeatureExtractor) -> int:
    """The length of the extractor's feature vectors (2048 for Inception-v3)."""
    if isinstance(extractor, ClassifierExtractor):
        return extractor.model.config.feature_dim
    return 2048
