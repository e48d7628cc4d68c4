"""The metrics on features: FID, Inception Score, precision/recall, class accuracy (ADM's definitions).

- FID: Frechet distance between Gaussians fitted to the features of the samples and of a reference set.
  Computed in float64 without a general matrix square root: tr(sqrt(S1 S2)) is the sum of the singular
  values of sqrt(S1) sqrt(S2) (symmetric square roots by eigh), so singular covariances (fewer images
  than feature dimensions) need no epsilon and no complex parts appear.
- Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over splits of 5,000 images as ADM does.
- Precision / recall: Kynkaenniemi et al. (2019), k-nearest-neighbour manifolds with k = 3. A sample is
  "precise" if it lies within the k-NN radius of some reference image; a reference image is "recalled"
  if it lies within the k-NN radius of some sample. Squared distances, computed in row x column blocks,
  so 50k x 50k never has to fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ClusterarError


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
