"""Reference statistics (mu, sigma and the features for precision/recall), computed once per extractor and
reference and cached next to the classifier, keyed by the extractor's fingerprint and the reference's
identity (content hash for bundled data; path, size and modification time for files). An ADM reference
batch's own mu / sigma are used for FID when their dimension fits the extractor, as ADM does."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..classifier import cache_dir
from ..errors import ClusterarError
from ..fileio import load_tensors, save_tensors
from .extractors import FeatureExtractor, feature_dim
from .maths import feature_statistics
from .sources import ImageSource, NpzSource, open_images

log = logging.getLogger("clusterar.metrics")


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
    if stored is not None and stored[0].shape != (feature_dim(extractor),):
        log.warning(
            "%s: its stored mu/sigma have %d dimensions, %s features %d; computing statistics from arr_0",
            source.name,
            stored[0].shape[0],
            extractor.name,
            feature_dim(extractor),
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
