"""`clusterar cluster inspect`: look at a clustering of a codebook, and measure why it matters.

The papers' motivating measurement (CTF Fig. 1b, IAR Fig. 2): encode real images, replace every token by a
random OTHER member of its own cluster, or by a random member of a random other cluster, decode, and
compare with the originals (and with the plain reconstruction, which isolates the swap from the
tokenizer's own error). If clusters group similar codes, same-cluster swaps barely change the image while
other-cluster swaps destroy it: a model that picks the right cluster but the wrong code within it makes a
small mistake, which is what IAR's loss and CTF's coarse stage exploit.

Also drawn: the cluster-size histogram and a 2-D PCA projection of the codebook coloured by cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset, to_float, to_uint8
from ..errors import ClusterarError
from ..fileio import write_json
from ..runtime import autocast
from ..tokenizer import VQModel
from ..train.tokenizer import fetch, psnr
from ..viz import image_grid, pyplot, save_figure
from .codebook import CodebookClusters

ROWS = ("original", "reconstruction", "same_cluster", "other_cluster")


def _uniform_below(high: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One uniform integer in [0, high_i) per entry of `high` (>= 1), vectorised."""
    u = torch.rand(high.shape, generator=gen, dtype=torch.float64)
    return torch.minimum((u * high).long(), high - 1)


def swap_tokens(ids: torch.Tensor, labels: torch.Tensor, same: bool, gen: torch.Generator) -> torch.Tensor:
    """Replace every id by a random id of its own cluster (same=True) or of another cluster (same=False).

    Same cluster: uniform over the OTHER members (a code alone in its cluster stays). Other cluster: a
    uniformly drawn non-empty cluster other than its own, then a uniform member of it. One pass over all
    tokens, no per-cluster loop: members are addressed through the codes sorted by cluster.
    """
    labels = labels.detach().cpu().long()
    k = labels.numel()
    flat = ids.detach().cpu().reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= k):
        raise ClusterarError(f"token ids must lie in [0, {k}) for these clusters")
    n = int(labels.max()) + 1
    order = torch.argsort(labels, stable=True)  # codes grouped by cluster
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)  # position of each code in `order`
    sizes = torch.bincount(labels, minlength=n)
    start = torch.cumsum(sizes, 0) - sizes
    own = labels[flat]
    if same:
        size = sizes[own]
        pick = _uniform_below((size - 1).clamp_min(1), gen)
        pos = rank[flat] - start[own]
        pick = pick + (pick >= pos).long()  # skip the token itself: uniform over the others
        pick = torch.where(size > 1, pick, 0)
        out = order[start[own] + pick]
    else:
        nonempty = (sizes > 0).nonzero()[:, 0]
        if nonempty.numel() < 2:
            raise ClusterarError("an other-cluster swap needs at least two non-empty clusters")
        index = torch.full((n,), -1, dtype=torch.long)
        index[nonempty] = torch.arange(nonempty.numel())
        shift = 1 + _uniform_below(torch.full_like(flat, nonempty.numel() - 1), gen)
        target = nonempty[(index[own] + shift) % nonempty.numel()]
        out = order[start[target] + _uniform_below(sizes[target], gen)]
    return out.reshape(ids.shape).to(ids.dtype)


def _psnr_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image [PSNR (dB, peak 255), MSE (pixels in [0, 1])] between uint8 image batches: [B, 2]."""
    mse = ((a.float() - b.float()) / 255).pow(2).flatten(1).mean(1)
    return torch.stack([psnr(a, b), mse], 1).double()


@torch.no_grad()
def swap_experiment(
    clusters: CodebookClusters,
    tokenizer: VQModel,
    data: str,
    image_size: int,
    n_images: int = 500,
    seed: int = 0,
    split: str = "val",
    batch_size: int = 250,
    show: int = 8,
) -> tuple[dict, torch.Tensor]:
    """Same- vs other-cluster swaps on `n_images` images of a split (evenly spaced through it).

    Returns (figures, picture): PSNR/MSE of reconstruction and both swaps against the originals, of both
    swaps against the reconstruction, the fraction of tokens a swap changed and the mean distance it moved
    a token in the (L2-normalised) code space; the picture is uint8 [4 * show, 3, H, W], rows in ROWS order.
    """
    if n_images < 1:
        raise ClusterarError(f"--n must be at least 1, got {n_images}")
    dataset = load_dataset(data, split, image_size)
    n = min(n_images, len(dataset))
    idx = torch.linspace(0, len(dataset) - 1, n).round().long()
    device = next(tokenizer.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    codes = tokenizer.quantize.codes().detach().float().cpu()
    kinds = ROWS[1:]
    pairs = [(k, "original") for k in kinds] + [(k, "reconstruction") for k in kinds[1:]]
    sums = {p: torch.zeros(2, dtype=torch.float64) for p in pairs}  # summed per-image [PSNR, MSE]
    changed = {k: 0 for k in kinds[1:]}
    moved = {k: 0.0 for k in kinds[1:]}
    shown: dict[str, list[torch.Tensor]] = {k: [] for k in ROWS}
    tokens = 0
    for i in range(0, n, batch_size):  # figures accumulate per batch: memory does not grow with n
        images = {"original": fetch(dataset, idx[i : i + batch_size])}
        with autocast(device):
            ids = tokenizer.encode(to_float(images["original"].to(device))).cpu()
        variants = {
            "reconstruction": ids,
            "same_cluster": swap_tokens(ids, clusters.labels, True, gen),
            "other_cluster": swap_tokens(ids, clusters.labels, False, gen),
        }
        for kind, v in variants.items():
            with autocast(device):
                images[kind] = to_uint8(tokenizer.decode(v.to(device)).float()).cpu()
            if kind != "reconstruction":
                changed[kind] += int((v != ids).sum())
                moved[kind] += float((codes[v] - codes[ids]).norm(dim=-1).sum())
        tokens += ids.numel()
        for a, b in pairs:
            sums[(a, b)] += _psnr_mse(images[a], images[b]).sum(0)
        for k in ROWS:
            shown[k].append(images[k][: max(0, show - i)])

    def mean(a: str, b: str) -> dict[str, float]:
        p, m = (sums[(a, b)] / n).tolist()
        return {"psnr": p, "mse": m}

    figures: dict = {"images": n, "data": data, "split": split, "seed": seed}
    figures["vs_original"] = {k: mean(k, "original") for k in kinds}
    figures["vs_reconstruction"] = {k: mean(k, "reconstruction") for k in kinds[1:]}
    figures["tokens_changed"] = {k: changed[k] / tokens for k in kinds[1:]}
    figures["code_distance"] = {k: moved[k] / tokens for k in kinds[1:]}
    picture = torch.cat([torch.cat(shown[k]) for k in ROWS])
    return figures, picture


def save_swap_picture(picture: torch.Tensor, path: str | Path, title: str = "") -> None:
    """The swap picture (rows in ROWS order) with each row labelled."""
    plt = pyplot()
    per_row = picture.shape[0] // len(ROWS)
    h = picture.shape[-2]
    scale = max(1, 64 // h)
    pad = 2
    grid = image_grid(picture, nrow=per_row, pad=pad, scale=scale)
    fig, ax = plt.subplots(figsize=(1.2 + grid.width / 100, 0.4 + grid.height / 100))
    ax.imshow(np.asarray(grid), interpolation="nearest")
    ax.set_yticks([scale * (pad + r * (h + pad) + h / 2) for r in range(len(ROWS))])
    ax.set_yticklabels([r.replace("_", "-") for r in ROWS])
    ax.set_xticks([])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path, dpi=100)


def plot_sizes_and_projection(clusters: CodebookClusters, codebook: torch.Tensor, path: str | Path) -> None:
    """Cluster-size histogram and a PCA projection of the L2-normalised codebook, a few clusters in colour."""
    plt = pyplot()
    x = torch.nn.functional.normalize(codebook.detach().double().cpu(), dim=1)
    x = x - x.mean(0)
    _, s, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    explained = float((s[:2] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    sizes = clusters.sizes.numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    lo, hi = int(sizes.min()), int(sizes.max())
    a.hist(sizes, bins=np.arange(lo, hi + 2) - 0.5 if hi - lo < 60 else 60, color="tab:blue")
    a.set_title(f"{clusters.n_clusters} clusters ({clusters.method}): {lo}..{hi} codes each")
    a.set_xlabel("codes per cluster")
    a.set_ylabel("clusters")
    # Hundreds of clusters cannot each get a distinguishable colour: all codes in grey, a few clusters
    # (evenly spread over the ids, non-empty) in colour. A projection only shrinks distances, so a cluster
    # that is tight in the codebook's space is tight here too.
    labels = clusters.labels.numpy()
    b.scatter(xy[:, 0], xy[:, 1], c="0.82", s=3, linewidths=0)
    nonempty = np.flatnonzero(sizes)
    shown = nonempty[np.linspace(0, len(nonempty) - 1, min(10, len(nonempty))).round().astype(int)]
    for i, c in enumerate(np.unique(shown)):
        sel = labels == c
        b.scatter(xy[sel, 0], xy[sel, 1], color=plt.cm.tab10(i % 10), s=14, linewidths=0, label=f"{c}")
    b.legend(title="cluster", fontsize=7, title_fontsize=7, loc="upper right", markerscale=1.5)
    b.set_title(
        f"codebook, PCA of the L2-normalised codes ({100 * explained:.0f}% of variance);\n"
        f"{len(np.unique(shown))} of {clusters.n_clusters} clusters in colour",
        fontsize=10,
    )
    b.set_xticks([])
    b.set_yticks([])
    save_figure(fig, path)


def inspect_clusters(
    clusters: CodebookClusters,
    tokenizer: VQModel,
    data: str,
    image_size: int,
    out: str | Path,
    n_images: int = 500,
    seed: int = 0,
    split: str = "val",
    info: dict | None = None,
) -> dict:
    """Write clusters.png, swap.png and inspect.json (figures and `info`) to `out`; return the figures."""
    out = Path(out)
    codebook = tokenizer.quantize.embedding.weight.detach()
    clusters.check_codebook(codebook, "tokenizer's codebook")
    figures, picture = swap_experiment(clusters, tokenizer, data, image_size, n_images, seed, split)
    sizes = clusters.sizes
    figures = {
        **(info or {}),
        "method": clusters.method,
        "n_clusters": clusters.n_clusters,
        "num_codes": clusters.num_codes,
        "objective": clusters.objective,
        "sizes": {
            "min": int(sizes.min()),
            "median": float(sizes.double().median()),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
        },
        "clusters_fingerprint": clusters.fingerprint(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        **figures,
    }
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{clusters.method}, {clusters.n_clusters} clusters: same-cluster "
        f"{figures['vs_original']['same_cluster']['psnr']:.1f} dB, other-cluster "
        f"{figures['vs_original']['other_cluster']['psnr']:.1f} dB (PSNR to the originals)"
    )
    save_swap_picture(picture, out / "swap.png", title)
    plot_sizes_and_projection(clusters, codebook, out / "clusters.png")
    write_json(out / "inspect.json", figures)
    return figures


def describe_clusters(
    clusters: CodebookClusters, seconds: float | None = None, info: dict | None = None
) -> str:
    """One line about a clustering: sizes, objective, time and convergence (what `cluster fit` prints)."""
    sizes = clusters.sizes
    empty = int((sizes == 0).sum())
    text = (
        f"{clusters.method}: {clusters.n_clusters} clusters of {clusters.num_codes} codes, sizes "
        f"{int(sizes.min())}..{int(sizes.max())} (median {float(sizes.double().median()):g}"
        f"{f', {empty} empty' if empty else ''}), objective (WCSS of the unit codes) {clusters.objective:.6g}"
    )
    if seconds is not None:
        text += f", {seconds:.2f} s"
    if info and "iters" in info:
        text += f", {info['iters']} iterations, {'converged' if info.get('converged') else 'NOT converged'}"
    return text


def format_table(figures: dict) -> str:
    """A short text table of the swap figures."""
    o, r = figures["vs_original"], figures["vs_reconstruction"]
    lines = [
        f"{figures['method']} clusters: {figures['n_clusters']} of {figures['sizes']['min']}.."
        f"{figures['sizes']['max']} codes, objective {figures['objective']:.4g}; "
        f"{figures['images']} {figures['data']} {figures['split']} images",
        f"{'':16}{'PSNR dB':>9}{'MSE':>10}{'PSNR vs recon':>15}{'tokens changed':>16}{'code dist':>11}",
        f"{'reconstruction':16}{o['reconstruction']['psnr']:9.2f}{o['reconstruction']['mse']:10.5f}",
    ]
    for k in ("same_cluster", "other_cluster"):
        lines.append(
            f"{k.replace('_', '-'):16}{o[k]['psnr']:9.2f}{o[k]['mse']:10.5f}{r[k]['psnr']:15.2f}"
            f"{100 * figures['tokens_changed'][k]:15.1f}%{figures['code_distance'][k]:11.3f}"
        )
    return "\n".join(lines)
