"""Fitting clusters to a VQ codebook: k-means (CTF), balanced k-means (IAR), hierarchical (average-linkage,
MASC), random (the ablation).

Both papers cluster the L2-normalised codebook rows (the tokenizer looks codes up by cosine), so every
method here normalises the rows first; the objective is the within-cluster sum of squares (WCSS) of those
unit rows around their cluster means.

Balanced k-means (IAR: n clusters of exactly m = K/n codes) alternates an optimal equal-size assignment
with a mean update. The assignment is a transportation problem (K points into n sinks of capacity m),
solved exactly as a min-cost circulation on the n-node "cluster graph", whose edge a -> b costs the
cheapest move of one member of a into b:

1. start from any feasible assignment (a vectorised greedy one, or the previous iteration's labels);
2. cancel negative cycles: a negative cycle is an improving rotation (one code moves along each edge, so
   sizes stay equal). A vectorised Bellman-Ford over each cluster's nearest centres finds them, and bulk
   pairwise swaps go first;
3. certify: the Bellman-Ford distances are a potential that prices every cluster; one dense pass over all
   (code, cluster) pairs checks that no move beats those prices. If one does, its edge joins the graph
   and step 2 resumes; if none does, no negative cycle exists among ALL cluster pairs, which is the
   optimality condition: the assignment is the exact optimum (up to float rounding), not an estimate.

Between Lloyd iterations the labels, the graph's extra edges and the potential carry over, so late
iterations cost little. An auction (every free code bids at once) settles most codes in a few rounds too,
but its tail is hundreds of one-code rounds with tiny price steps; cycle cancelling moves whole chains.

The centre update is the plain mean, not re-normalised (as IAR): the mean minimises the WCSS for fixed
labels, so assignment and update both never increase it and the iteration stops when labels repeat.

IAR's own script (kept as the reference baseline in `benchmarks/iar_reference.py`) assigns greedily in
Python loops: minutes per run, not converged, ~6% of codes outside their nearest centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ..errors import ClusterarError

CLUSTER_METHODS = ("kmeans", "balanced", "hierarchical", "random")  # what `CodebookClusters.fit` offers
# methods whose clusters have unequal sizes (CTF's; IAR's rearranged ids need equal ones)
UNEQUAL_METHODS = ("kmeans", "hierarchical")
_TOL = 1e-10  # strict-improvement threshold on costs of order 1: float64 noise never counts as a gain


# ----------------------------------------------------------------------------- input checks


def unit_codebook(x: torch.Tensor, what: str = "codebook") -> torch.Tensor:
    """Validate a [K, D] codebook and return its L2-normalised rows in float64 (same device)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 2:
        raise ClusterarError(f"{what} must be a 2-D tensor [K codes, D dims], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ClusterarError(f"{what} is empty (shape {tuple(x.shape)})")
    if not (x.is_floating_point() or x.is_complex()):
        x = x.double()
    x = x.detach().double()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(1).nonzero()[:, 0]
        raise ClusterarError(
            f"{what} has NaN or infinite values in {bad.numel()} rows (first: {bad[:5].tolist()}); "
            "the tokenizer is probably corrupt or diverged in training"
        )
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _divisors(k: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(k) + 1) if k % d == 0]
    return sorted(set(small + [k // d for d in small]))


def check_n_clusters(k: int, n: int, balanced: bool) -> int:
    """n as an int, or a clear error if n clusters cannot be made of k codes (balanced: k % n == 0)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ClusterarError(f"n_clusters must be an integer, got {n!r}")
    n = int(n)
    if n < 1 or n > k:
        raise ClusterarError(f"n_clusters must be between 1 and the number of codes K={k}, got {n}")
    if balanced and k % n:
        divs = _divisors(k)
        below = max(d for d in divs if d < n)
        above = min((d for d in divs if d > n), default=None)
        near = f"{below}" if above is None else f"{below} or {above}"
        raise ClusterarError(
            f"balanced clusters need K={k} codes to split evenly, but {k} is not divisible by "
            f"n_clusters={n}; the nearest valid values are {near}"
        )
    return n


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: random draws depend on the seed alone, not on the device."""
    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------- shared pieces


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means [n, D], sizes [n]), summed in a fixed order so that results are deterministic on GPU too."""
    sizes = torch.bincount(labels, minlength=n)
    if x.device.type == "cpu":
        sums = x.new_zeros(n, x.shape[1]).index_add_(0, labels, x)
    else:  # atomic adds would make the float sums order-dependent: segment sums of sorted rows instead
        order = torch.argsort(labels, stable=True)
        csum = torch.cat([x.new_zeros(1, x.shape[1]), torch.cumsum(x[order], 0)])
        ends = torch.cumsum(sizes, 0)
        sums = csum[ends] - csum[ends - sizes]
    return sums / sizes.clamp_min(1)[:, None].to(x.dtype), sizes


def wcss(x: torch.Tensor, labels: torch.Tensor, n_clusters: int | None = None) -> float:
    """Within-cluster sum of squares of the L2-normalised rows of `x` around their cluster means."""
    xn = unit_codebook(x)
    labels = torch.as_tensor(labels).to(xn.device).long()
    n = int(labels.max()) + 1 if n_clusters is None else n_clusters
    means, _ = _cluster_means(xn, labels, n)
    return float(((xn - means[labels]) ** 2).sum())


def _kmeanspp(x: torch.Tensor, n: int, gen: torch.Generator, trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding (D^2 sampling, best of a few candidates per step), drawn on CPU so that a
    seed gives the same centres on every device."""
    xc = x.cpu()
    k = xc.shape[0]
    trials = trials or 2 + int(math.log(n))
    sq = (xc * xc).sum(1)
    first = int(torch.randint(k, (1,), generator=gen))
    idx = [first]
    d2 = ((xc - xc[first]) ** 2).sum(1)
    for _ in range(1, n):
        w = d2.clamp_min(0)
        if float(w.sum()) <= 0:  # fewer distinct points than clusters: any unused point will do
            w = torch.ones(k, dtype=xc.dtype)
            w[idx] = 0
        cand = torch.multinomial(w, trials, replacement=True, generator=gen)
        cd2 = torch.addmm(sq[cand][:, None] + sq[None], xc[cand], xc.T, alpha=-2.0)
        cd2 = torch.minimum(d2[None], cd2)
        best = int(torch.argmin(cd2.sum(1)))
        idx.append(int(cand[best]))
        d2 = cd2[best]
    return x[torch.tensor(idx, device=x.device)]


def _nearest(
    x: torch.Tensor,
    centres: torch.Tensor,
    offset: torch.Tensor | None = None,
    values: bool = False,
    rows: int = 1024,
):
    """argmin_j ||x_i - c_j||^2 + offset_j (up to a per-row constant) for every row, computed in x's dtype
    in cache-sized row blocks without a [K, n] temporary. Returns labels, or (values, labels)."""
    c = centres.to(x.dtype)
    sq = (c * c).sum(1)
    if offset is not None:
        sq = sq + offset.to(x.dtype)
    buf = x.new_empty(min(rows, x.shape[0]), c.shape[0])
    vals = x.new_empty(x.shape[0])
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        j = min(i + rows, x.shape[0])
        out = buf[: j - i]
        torch.addmm(sq, x[i:j], c.T, alpha=-2.0, out=out)
        torch.min(out, 1, out=(vals[i:j], labels[i:j]))
    return (vals, labels) if values else labels


def _lloyd(
    x: torch.Tensor, centres: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Plain Lloyd iterations from `centres` until the labels repeat; returns (labels, centres, iters,
    converged). Empty clusters are re-seeded at the points farthest from their centre."""
    n = centres.shape[0]
    x32 = x.float()
    labels = None
    it, converged = 0, False
    while it < iters:
        it += 1
        new = _nearest(x32, centres)
        if labels is not None and torch.equal(new, labels):
            converged = True
            break
        labels = new
        centres, sizes = _cluster_means(x, labels, n)
        empty = (sizes == 0).nonzero()[:, 0]
        if empty.numel():
            far = ((x - centres[labels]) ** 2).sum(1).topk(empty.numel()).indices
            centres[empty] = x[far]
    return labels, centres, it, converged


# ----------------------------------------------------------------------------- restarts


def _check_restarts(n_init: int) -> int:
    if int(n_init) != n_init or n_init < 1:
        raise ClusterarError(
            f"the number of k-means++ starts (--restarts, n_init) must be at least 1, got {n_init}"
        )
    return int(n_init)


def _best_of(
    xn: torch.Tensor,
    n: int,
    starts: int,
    run: Callable[[], tuple[torch.Tensor, dict]],
    info: dict | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best of `starts` calls of `run` (one start each, drawing its own seeding): (labels, centres =
    the labels' means, objective = WCSS), the first one on ties. `run` returns the labels and a record
    (iters, converged, ...) that gets the objective added; `info` receives all records and their totals."""
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    runs = []
    for _ in range(starts):
        labels, record = run()
        centres, _ = _cluster_means(xn, labels, n)
        obj = float(((xn - centres[labels]) ** 2).sum())
        runs.append({**record, "objective": obj})
        if best is None or obj < best[2]:
            best = (labels, centres, obj)
    if info is not None:
        info.update(
            runs=runs, iters=sum(r["iters"] for r in runs), converged=all(r["converged"] for r in runs)
        )
    return best


# ----------------------------------------------------------------------------- k-means (CTF)


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    n_init: int = 3,
    iters: int = 300,
    seed: int = 0,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """k-means on the L2-normalised rows of x [K, D]: k-means++ seeding, Lloyd iterations, `n_init` restarts.

    Returns (labels int64 [K], centres [n, D] float64, objective = WCSS), keeping the restart with the lowest
    objective. Runs on x.device; the seeding is drawn on CPU, so a seed gives the same start everywhere.
    A restart stops when its labels repeat (then every label is the nearest centre, compared in float32)
    or after `iters` iterations.
    """
    xn = unit_codebook(x)
    n = check_n_clusters(xn.shape[0], n_clusters, balanced=False)
    gen = seeded_generator(seed)
    starts = _check_restarts(n_init)

    def run() -> tuple[torch.Tensor, dict]:
        labels, _, it, converged = _lloyd(xn, _kmeanspp(xn, n, gen), iters)
        return labels, {"iters": it, "converged": converged}

    return _best_of(xn, n, starts, run, info)


# ----------------------------------------------------------------------------- balanced assignment


def _greedy_start(x: torch.Tensor, centres: torch.Tensor, m: int) -> torch.Tensor:
    """A feasible equal-size assignment to improve from: in rounds, every unplaced point proposes to its
    nearest centre with room and each centre accepts its closest proposers up to its free capacity."""
    k, n = x.shape[0], centres.shape[0]
    dev = x.device
    labels = torch.full((k,), -1, dtype=torch.long, device=dev)
    room = torch.full((n,), m, dtype=torch.long, device=dev)
    free = torch.arange(k, device=dev)
    sq = (centres * centres).sum(1)
    while free.numel():
        cost = sq - 2.0 * (x[free] @ centres.T)
        cost[:, room == 0] = math.inf
        dist, want = cost.min(1)
        order = torch.argsort(dist, stable=True)
        order = order[torch.argsort(want[order], stable=True)]
        want = want[order]
        counts = torch.bincount(want, minlength=n)
        rank = torch.arange(order.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[want]
        take = rank < room[want]
        labels[free[order[take]]] = want[take]
        room -= torch.bincount(want[take], minlength=n)
        free = free[order[~take]]
    return labels


def _pred_cycles(pred: torch.Tensor) -> list[list[int]]:
    """Cycles of a predecessor graph (pred[b] = a for an edge a -> b, -1 = root), nodes in edge order."""
    n = pred.numel()
    up = torch.where(pred < 0, torch.arange(n, device=pred.device), pred)
    for _ in range(math.ceil(math.log2(max(n, 2))) + 1):  # >= n hops: every walk now sits on its cycle
        up = up[up]
    ends = up[pred[up] >= 0].unique().tolist()
    p = pred.tolist()
    cycles, seen = [], set()
    for v in ends:
        if v in seen:
            continue
        cyc = []
        while v not in seen:
            seen.add(v)
            cyc.append(v)
            v = p[v]
        cycles.append(cyc[::-1])
    return cycles


class _Balanced:
    """An equal-size assignment of points to fixed centres, improved until it is optimal.

    Kept as members [n, m] (point ids per cluster). The cluster graph has an edge a -> b to each of the
    `neighbours` centres nearest to a (plus edges `solve` found necessary); its weight is the cheapest
    cost change of moving one member of a into b. A negative cycle is an improving rotation (one point
    moves along each edge, so sizes stay equal); with none left in the graph of ALL cluster pairs, the
    assignment is optimal. `solve` checks all pairs in one dense pass using the Bellman-Ford distances
    as potentials, so the dense graph itself is never searched.
    """

    def __init__(self, x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, neighbours: int):
        self.x = x
        self.n = centres.shape[0]
        self.m = x.shape[0] // self.n
        self.neighbours = neighbours
        self.extra = torch.empty(0, dtype=torch.long, device=x.device)  # a * n + b: edges added by solve
        self.members = torch.argsort(labels, stable=True).view(self.n, self.m)
        self.slot = torch.empty_like(labels)
        self.slot[self.members.reshape(-1)] = torch.arange(x.shape[0], device=x.device)
        self.potential: torch.Tensor | None = None  # proof of optimality for the current centres
        self.start: torch.Tensor | None = None  # the last potential: a warm start for the next search
        self.set_centres(centres)

    @property
    def labels(self) -> torch.Tensor:
        labels = torch.empty(self.x.shape[0], dtype=torch.long, device=self.x.device)
        labels[self.members.reshape(-1)] = torch.arange(self.n, device=self.x.device).repeat_interleave(
            self.m
        )
        return labels

    def set_centres(self, centres: torch.Tensor) -> None:
        """New centres: rebuild the neighbour lists (nearest centres plus certified extras) and all edges."""
        self.centres = centres
        self.sq = (centres * centres).sum(1)
        self.potential = None
        n, dev = self.n, centres.device
        width = min(self.neighbours, n - 1)
        d = torch.cdist(centres, centres)
        d.fill_diagonal_(-1.0)
        knn = d.topk(width + 1, dim=1, largest=False).indices[:, 1:]  # drop the centre itself
        pairs = (torch.arange(n, device=dev)[:, None] * n + knn).reshape(-1)
        if self.extra.numel():
            pairs = torch.cat([pairs, self.extra]).unique()
        src, dst = pairs // n, pairs % n
        counts = torch.bincount(src, minlength=n)
        width = int(counts.max())
        col = torch.arange(pairs.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[src]
        nbr = torch.full((n, width), -1, dtype=torch.long, device=dev)
        nbr[src, col] = dst
        self.nbr = nbr
        self.valid = nbr >= 0
        e = n * width
        # source cluster of every edge; edge e is the padding edge (weight inf)
        self.src = torch.cat([torch.arange(n, device=dev).repeat_interleave(width), nbr.new_zeros(1)])
        self.dst = nbr.clamp_min(0).reshape(-1)
        self.w_ext = centres.new_full((e + 1,), math.inf)
        self.w = self.w_ext[:e].view(n, width)
        self.arg = torch.zeros(n, width, dtype=torch.long, device=dev)
        # incoming edges of every cluster, padded with edge e (weight inf): Bellman-Ford reads them densely
        eid = self.valid.reshape(-1).nonzero()[:, 0]
        eid = eid[torch.argsort(self.dst[eid], stable=True)]
        into = self.dst[eid]
        counts = torch.bincount(into, minlength=n)
        col = torch.arange(eid.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[into]
        self.in_eid = torch.full((n, max(1, int(counts.max()))), e, dtype=torch.long, device=dev)
        self.in_eid[into, col] = eid
        self.in_src = self.src[self.in_eid]
        self.refresh(torch.arange(n, device=dev))

    def refresh(self, clusters: torch.Tensor) -> None:
        """Recompute the outgoing edges of `clusters` (after their members changed)."""
        width = self.nbr.shape[1]
        chunk = max(1, (1 << 22) // (self.m * width))
        for i in range(0, clusters.numel(), chunk):
            cl = clusters[i : i + chunk]
            pts = self.members[cl]
            xp = self.x[pts]
            own = self.sq[cl][:, None] - 2.0 * (xp * self.centres[cl][:, None, :]).sum(-1)
            tgt = self.nbr[cl].clamp_min(0)
            to = self.sq[tgt][:, None, :] - 2.0 * torch.bmm(xp, self.centres[tgt].transpose(1, 2))
            w, a = (to - own[..., None]).min(1)
            self.w[cl] = w.masked_fill(~self.valid[cl], math.inf)
            self.arg[cl] = pts.gather(1, a)

    def rotate(self, cycles: list[list[int]], refresh: bool = True) -> torch.Tensor:
        """Move one point along every edge of the given disjoint cycles (edge ids); returns the clusters
        changed, whose outgoing edges are refreshed now or, with refresh=False, disabled until refreshed."""
        dev = self.w.device
        edges = torch.tensor([e for c in cycles for e in c], device=dev)
        nxt = torch.tensor([c[(i + 1) % len(c)] for c in cycles for i in range(len(c))], device=dev)
        arg = self.arg.reshape(-1)
        # each point takes the slot of the point leaving its target cluster
        pts, slots = arg[edges], self.slot[arg[nxt]]
        self.members.view(-1)[slots] = pts
        self.slot[pts] = slots
        changed = self.src[edges].unique()
        if refresh:
            self.refresh(changed)
        else:
            self.w[changed] = math.inf
        return changed

    def swaps(self) -> int:
        """Apply at once every improving pairwise swap between mutually best cluster pairs; returns moves."""
        n, width = self.nbr.shape
        flat = self.valid.reshape(-1)
        back = torch.full((n, n), math.inf, dtype=self.w.dtype, device=self.w.device)
        src = self.src[:-1]
        back[src[flat], self.dst[flat]] = self.w.reshape(-1)[flat]
        gain = self.w + back.T[src, self.dst].view(n, width)  # w[a, b] + w[b, a]
        best, col = gain.min(1)
        partner = self.nbr.gather(1, col[:, None])[:, 0].clamp_min(0)
        mutual = (partner[partner] == torch.arange(n, device=partner.device)) & (best < -_TOL)
        a = mutual.nonzero()[:, 0]
        a = a[a < partner[a]]
        if a.numel() == 0:
            return 0
        b = partner[a]
        pairs = zip((a * width + col[a]).tolist(), (b * width + col[b]).tolist(), strict=True)
        self.rotate([[e1, e2] for e1, e2 in pairs])
        return 2 * a.numel()

    def optimise(self, check: int = 4) -> int:
        """Cancel negative cycles of the graph until none is left; returns the number of points moved.

        Bulk pairwise swaps first, then one running Bellman-Ford from a virtual source: each cycle of its
        predecessor graph is rotated as soon as it appears, the rotated clusters' outgoing edges are
        disabled until the search stalls, then refreshed together, and the search goes on from the current
        distances. It ends when no edge relaxes and none is stale; the distances are then a feasible
        potential (kept for `solve`), which proves that no negative cycle is left.
        """
        moved = 0
        while step := self.swaps():
            moved += step
        n, dev = self.n, self.w.device
        # any start is valid; the last potential is nearly feasible after a small move of the centres
        dist = torch.zeros(n, dtype=self.w.dtype, device=dev) if self.start is None else self.start.clone()
        edge = torch.full((n,), -1, dtype=torch.long, device=dev)  # predecessor edge of each cluster
        stale: list[torch.Tensor] = []
        passes = since = 0
        while True:
            new, arg = (dist[self.in_src] + self.w_ext[self.in_eid]).min(1)
            better = new < dist - _TOL
            if not bool(better.any()):
                if not stale:
                    self.potential = self.start = dist
                    return moved
                self.refresh(torch.cat(stale).unique())
                stale = []
                continue
            edge = torch.where(better, self.in_eid.gather(1, arg[:, None])[:, 0], edge)
            dist = torch.where(better, new, dist)
            passes += 1
            since += 1
            if passes % check:
                continue
            pred = torch.where(edge >= 0, self.src[edge.clamp_min(0)], -1)
            cycles = [[int(edge[v]) for v in cyc] for cyc in _pred_cycles(pred)]
            w = self.w_ext
            cycles = [c for c in cycles if float(w[c].sum()) < -_TOL]  # stale pointers can close others
            if cycles:
                changed = self.rotate(cycles, refresh=False)
                stale.append(changed)
                moved += sum(len(c) for c in cycles)
                edge[changed] = -1
                since = 0
            elif since > 4 * n + 16:  # no cycle shows up for too long: restart the search afresh
                dist.zero_()
                edge.fill_(-1)
                since = 0

    def solve(self) -> int:
        """Make the assignment optimal for the current centres; returns the number of points moved.

        Cancels negative cycles in the neighbour graph, then checks every (code, cluster) pair at once
        against the potential that proves the neighbour graph optimal. Where a move beats the potential,
        edges to the mover's cheapest clusters join the graph (for the following iterations too; after
        several rounds every list is widened) and the search goes on; when none does, the assignment is
        optimal among all equal-size assignments.
        """
        moved = self.optimise()
        rounds = 0
        while True:
            pot = self.potential
            labels = self.labels
            own = self.sq[labels] - 2.0 * (self.x * self.centres[labels]).sum(1) - pot[labels]
            best, _ = _nearest(self.x, self.centres, offset=-pot, values=True)
            bad = best < own - _TOL
            if not bool(bad.any()):
                return moved
            # add edges from each violating point's cluster to its few cheapest clusters under the prices
            pts = bad.nonzero()[:, 0]
            price = self.sq - pot - 2.0 * (self.x[pts] @ self.centres.T)
            top = price.topk(min(8, self.n), dim=1, largest=False).indices
            self.extra = torch.cat([self.extra, (labels[pts, None] * self.n + top).reshape(-1)]).unique()
            self.extra = self.extra[self.extra // self.n != self.extra % self.n]
            rounds += 1
            if rounds > 3:  # the nearest centres keep missing moves (e.g. many coinciding centres): widen
                self.neighbours = min(2 * self.neighbours, self.n - 1)
            self.set_centres(self.centres)
            moved += self.optimise()


def balanced_assign(x: torch.Tensor, centres: torch.Tensor, *, neighbours: int = 48) -> torch.Tensor:
    """The optimal assignment of the normalised rows of x [K, D] to `centres` [n, D] with exactly K/n
    points per centre (minimum summed squared distance; exact up to float rounding).

    Greedy start, then negative-cycle cancelling in the cluster graph over each cluster's `neighbours`
    nearest centres, until a dense check over all cluster pairs certifies optimality.
    """
    xn = unit_codebook(x)
    centres = torch.as_tensor(centres).to(xn)
    if centres.dim() != 2 or centres.shape[1] != xn.shape[1]:
        raise ClusterarError(f"centres must be [n, {xn.shape[1]}], got shape {tuple(centres.shape)}")
    n = check_n_clusters(xn.shape[0], centres.shape[0], balanced=True)
    if n == 1:
        return torch.zeros(xn.shape[0], dtype=torch.long, device=xn.device)
    state = _Balanced(xn, centres, _greedy_start(xn, centres, xn.shape[0] // n), neighbours)
    state.solve()
    return state.labels


def balanced_kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    iters: int = 300,
    seed: int = 0,
    n_init: int = 1,
    warmup: int = 300,
    init: torch.Tensor | None = None,
    neighbours: int = 48,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Balanced k-means on the L2-normalised rows of x [K, D]: exactly K/n codes per cluster.

    k-means++ seeding and `warmup` plain Lloyd iterations (cheap, and they leave little for the constrained
    ones to do), or the given `init` centres; then alternate the optimal equal-size assignment (see the
    module docstring) with the mean update (not re-normalised) until the labels repeat: a fixed point where
    the assignment is optimal for the centres and the centres are the means. Every step lowers the WCSS,
    so started from another method's result it can only improve on it. Returns (labels, centres,
    objective) of the best of `n_init` starts. Deterministic under `seed`.
    """
    xn = unit_codebook(x)
    k = xn.shape[0]
    n = check_n_clusters(k, n_clusters, balanced=True)
    m = k // n
    gen = seeded_generator(seed)
    if init is not None:
        init = torch.as_tensor(init).to(xn)
        if init.shape != (n, xn.shape[1]):
            raise ClusterarError(f"init must be centres [{n}, {xn.shape[1]}], got shape {tuple(init.shape)}")
    starts = 1 if init is not None else _check_restarts(n_init)

    def run() -> tuple[torch.Tensor, dict]:
        if init is not None:
            centres = init
        else:
            centres = _kmeanspp(xn, n, gen)
            if warmup:  # unconstrained Lloyd is cheap and lands near a balanced optimum on codebook-like data
                centres = _lloyd(xn, centres, warmup)[1]
        if n == 1:
            labels = torch.zeros(k, dtype=torch.long, device=xn.device)
            return labels, {"iters": 0, "converged": True, "moved": 0}
        state = _Balanced(xn, centres, _greedy_start(xn, centres, m), neighbours)
        it, converged, moved = 0, False, 0
        for it in range(1, iters + 1):
            step = state.solve()
            if step == 0 and it > 1:  # the labels repeat: a fixed point
                converged = True
                break
            moved += step
            centres, _ = _cluster_means(xn, state.labels, n)
            state.set_centres(centres)
        return state.labels, {"iters": it, "converged": converged, "moved": moved}

    return _best_of(xn, n, starts, run, info)


# ----------------------------------------------------------------------------- hierarchical clusters


def hierarchical(
    codebook: torch.Tensor, n_clusters: int, *, info: dict | None = None
) -> tuple[torch.Tensor, float]:
    """(labels [K], WCSS) of average-linkage (UPGMA) agglomerative clustering of the L2-normalised rows, cut
    where exactly `n_clusters` clusters remain (MASC's density-driven clusters).

    SciPy builds the tree (`linkage(method="average")` on the condensed Euclidean distances: K(K-1)/2
    float64s, 1.07 GB for 16,384 codes, 2.3 GB at the peak as measured by benchmarks/bench_hierarchical.py).
    The cut applies the first K - n merges of the tree (a union-find over its rows), which gives exactly n
    clusters even where merges tie in height (scipy's maxclust criterion may give fewer). Clusters are
    numbered by their smallest code id; there is no randomness.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    x = unit_codebook(codebook)
    k = x.shape[0]
    n = check_n_clusters(k, n_clusters, balanced=False)
    tree = linkage(pdist(x.cpu().double().numpy()), method="average")
    parent = np.arange(2 * k - 1)  # tree node i >= k is the merge of row i - k

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row, (a, b) in enumerate(tree[: k - n, :2].astype(np.int64)):
        parent[root(int(a))] = parent[root(int(b))] = k + row
    roots = np.array([root(i) for i in range(k)])
    _, first = np.unique(roots, return_index=True)  # number clusters by their smallest code id
    order = np.argsort(first)
    rank = np.empty(len(first), dtype=np.int64)
    rank[order] = np.arange(len(first))
    labels = torch.from_numpy(rank[np.unique(roots, return_inverse=True)[1]])
    if info is not None:
        info.update(cut_height=float(tree[k - n - 1, 2]) if n < k else 0.0, merges=k - n)
    return labels, wcss(x, labels, n)


# ----------------------------------------------------------------------------- random clusters


def random_clusters(k: int, n_clusters: int, *, balanced: bool = True, seed: int = 0) -> torch.Tensor:
    """Labels [K] of a random clustering (the papers' ablation): exactly K/n per cluster when `balanced`,
    otherwise every code in a uniformly drawn cluster (each cluster gets at least one code)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ClusterarError(f"the number of codes K must be a positive integer, got {k!r}")
    n = check_n_clusters(int(k), n_clusters, balanced)
    gen = seeded_generator(seed)
    order = torch.randperm(k, generator=gen)
    if balanced:
        labels = torch.empty(k, dtype=torch.long)
        labels[order] = torch.arange(k) // (k // n)
        return labels
    labels = torch.randint(n, (k,), generator=gen)
    labels[order[:n]] = torch.arange(n)  # no empty cluster
    return labels
