"""IAR's balanced k-means script, re-implemented faithfully: the baseline that `balanced_kmeans` beats.

IAR's script starts from random data points as centres, then runs 100 iterations of a greedy equal-size
assignment (Python loops over torch scalars) and a mean update, with no convergence test.
`clusterar.clusters.balanced_kmeans` replaces it with an exact assignment iterated to a fixed point. This
copy reproduces the script's decisions (and its slowness) so that benchmarks/bench_clusters.py can time
and score both in one process and tests/test_clusters.py can check that ours is never worse. Nothing in
the library uses it, so it lives here rather than in clusterar.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from clusterar.clusters.fit import check_n_clusters, seeded_generator, unit_codebook


def _greedy_assign(xn: torch.Tensor, centres: torch.Tensor, m: int, fast_loops: bool = False) -> torch.Tensor:
    """IAR's assignment step: points in order of their nearest-centre distance, each into its nearest
    centre that still has room. Python loops over torch scalars as in their script, or over numpy
    scalars with `fast_loops` (the same decisions, about 20x faster)."""
    k, n = xn.shape[0], centres.shape[0]
    dist = torch.cdist(xn, centres)
    prefs = torch.argsort(dist, dim=1)
    visit = torch.argsort(dist.min(dim=1).values)
    if fast_loops:
        prefs_np, out, room = prefs.numpy(), np.full(k, -1, dtype=np.int64), [m] * n
        for i in visit.tolist():
            for c in prefs_np[i]:
                if room[c]:
                    out[i] = c
                    room[c] -= 1
                    break
        return torch.from_numpy(out)
    labels = torch.full((k,), -1, dtype=torch.long)
    counts = torch.zeros(n, dtype=torch.long)
    for i in visit:
        for c in prefs[i]:
            if counts[c] < m:
                labels[i] = c
                counts[c] += 1
                break
    return labels


def iar_greedy_assign(x: torch.Tensor, centres: torch.Tensor, *, fast_loops: bool = False) -> torch.Tensor:
    """The greedy equal-size assignment of IAR's script (reference baseline; the exact one is
    `clusterar.clusters.balanced_assign`)."""
    xn = unit_codebook(x).float().cpu()
    centres = torch.as_tensor(centres).float().cpu()
    n = check_n_clusters(xn.shape[0], centres.shape[0], balanced=True)
    return _greedy_assign(xn, centres, xn.shape[0] // n, fast_loops)


def iar_greedy_balanced_kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    iters: int = 100,
    seed: int = 0,
    max_seconds: float | None = None,
    fast_loops: bool = False,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Reference baseline, NOT recommended: a faithful re-implementation of IAR's balanced k-means script.

    Random data points as initial centres; each iteration visits the points in order of their distance to
    the nearest centre and puts each one into its nearest centre that still has room (greedy, capacity
    m = K/n), then moves every centre to the mean of its members; a fixed number of iterations, no
    convergence test. The loops run in Python over torch scalars as in their script, which is what makes
    it slow (seconds per iteration); `fast_loops` makes the same decisions with numpy scalars. The greedy
    assignment is not optimal: late points land far from their nearest centre. `max_seconds` stops after
    the iteration that crosses the limit; `info` receives the iterations done and the time.
    """
    xn = unit_codebook(x).float().cpu()
    k = xn.shape[0]
    n = check_n_clusters(k, n_clusters, balanced=True)
    m = k // n
    gen = seeded_generator(seed)
    centres = xn[torch.randperm(k, generator=gen)[:n]].clone()
    labels = torch.full((k,), -1, dtype=torch.long)
    t0 = time.perf_counter()
    done = 0
    for _ in range(iters):
        labels = _greedy_assign(xn, centres, m, fast_loops)
        centres = torch.stack([xn[labels == c].mean(dim=0) for c in range(n)])
        done += 1
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    obj = float(((xn.double() - centres.double()[labels]) ** 2).sum())
    if info is not None:
        info.update(iters=done, seconds=time.perf_counter() - t0)
    return labels, centres.double(), obj
