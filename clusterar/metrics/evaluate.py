"""`evaluate_images`: FID, Inception Score, precision/recall and class accuracy of generated images against
a reference, and the table `clusterar evaluate` prints."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch

from ..errors import ClusterarError
from .extractors import ClassifierExtractor, FeatureExtractor, make_extractor
from .maths import class_accuracy, feature_statistics, frechet_distance, inception_score, precision_recall
from .reference import reference_statistics
from .sources import ImageSource, check_labels, open_images

log = logging.getLogger("clusterar.metrics")

IS_SPLIT_SIZE = 5000  # ADM's split size for the Inception Score


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
        samples.labels_from = "labels"
    ref_source = open_images(reference, image_size, require_images=False)
    ext = make_extractor(extractor, ref_source, cache, device, progress)
    if samples.labels is not None and isinstance(ext, ClassifierExtractor):  # before the work
        check_labels(samples.labels, len(samples), samples.labels_from, ext.model.config.num_classes)
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
