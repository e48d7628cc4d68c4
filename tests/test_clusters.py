"""Codebook clustering: exact balance, optimality of the balanced assignment, the permutation, files, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from benchmarks.iar_reference import iar_greedy_assign, iar_greedy_balanced_kmeans
from clusterar.clusters import (
    CodebookClusters,
    balanced_assign,
    balanced_kmeans,
    hierarchical,
    kmeans,
    permute_codebook,
    permute_rows,
    random_clusters,
    remap_tokens,
    unmap_tokens,
    wcss,
)
from clusterar.errors import ClusterarError


def codebook(k: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Raw (unnormalised) codebook rows, as a tokenizer stores them."""
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) * 3.0


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def assignment_cost(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((unit(x) - centres.double()[labels]) ** 2).sum())


def optimal_cost(x: torch.Tensor, centres: torch.Tensor) -> tuple[float, np.ndarray]:
    """Exact optimum by the Hungarian method on the centres replicated m times."""
    n = centres.shape[0]
    m = x.shape[0] // n
    cost = (torch.cdist(unit(x), centres.double()) ** 2).repeat_interleave(m, dim=1).numpy()
    rows, cols = linear_sum_assignment(cost)
    labels = np.empty(x.shape[0], dtype=np.int64)
    labels[rows] = cols // m
    return float(cost[rows, cols].sum()), labels


@pytest.fixture(scope="module")
def fitted() -> dict[str, tuple[torch.Tensor, CodebookClusters]]:
    cb = codebook(240)
    return {
        method: (cb, CodebookClusters.fit(cb, method, 12, seed=3))
        for method in ("kmeans", "balanced", "hierarchical", "random")
    }


# ----------------------------------------------------------------------------- the algorithms


@pytest.mark.parametrize(("k", "n"), [(64, 1), (64, 4), (96, 12), (240, 40), (60, 60), (512, 32)])
def test_balanced_kmeans_exact_sizes(k: int, n: int) -> None:
    labels, centres, objective = balanced_kmeans(codebook(k, seed=k + n), n, seed=1)
    assert labels.dtype == torch.int64 and labels.shape == (k,)
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), k // n))
    assert centres.shape == (n, 8)
    assert objective == pytest.approx(wcss(codebook(k, seed=k + n), labels, n), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_balanced_assign_is_optimal_against_hungarian(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = [3, 2, 4, 5, 3, 6][seed]
    k = n * [4, 6, 3, 4, 7, 5][seed]
    x = torch.randn(k, 3, generator=g)
    centres = torch.randn(n, 3, generator=g, dtype=torch.float64) * 0.6
    labels = balanced_assign(x, centres)
    best, best_labels = optimal_cost(x, centres)
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), k // n))
    assert assignment_cost(x, centres, labels) == pytest.approx(best, abs=1e-9)
    assert np.array_equal(labels.numpy(), best_labels)  # random data: the optimum is unique


def test_balanced_assign_tiny_fixed_case() -> None:
    """K=12, n=3: centres at three points of the circle, the codes crowding around the first."""
    angles = torch.tensor([0.0, 0.1, -0.1, 0.2, -0.2, 0.3, 2.0, 2.1, 4.0, 4.2, 0.05, -0.3])
    x = torch.stack([angles.cos(), angles.sin()], 1)
    centres = torch.tensor([[1.0, 0.0], [-0.4, 0.9], [-0.6, -0.8]], dtype=torch.float64)
    labels = balanced_assign(x, centres)
    best, best_labels = optimal_cost(x, centres)
    assert assignment_cost(x, centres, labels) == pytest.approx(best, abs=1e-12)
    assert np.array_equal(labels.numpy(), best_labels)
    nearest = torch.cdist(unit(x), centres).argmin(1)
    assert (nearest == 0).sum() > 4  # the constraint binds: some codes cannot have their nearest centre


def test_balanced_assign_larger_case_against_hungarian() -> None:
    """Enough clusters that the neighbour-restricted search plus the dense certificate both matter."""
    x = codebook(384, d=4, seed=7)
    centres = unit(codebook(48, d=4, seed=8)) * 0.9
    labels = balanced_assign(x, centres, neighbours=3)
    best, _ = optimal_cost(x, centres)
    assert assignment_cost(x, centres, labels) == pytest.approx(best, abs=1e-9)


def test_balanced_assign_with_duplicate_codes() -> None:
    """A third of the codes identical (like never-trained codes): ties everywhere, still the optimum."""
    x = codebook(192, d=4, seed=9)
    x[:64] = x[0]
    centres = unit(codebook(12, d=4, seed=10)) * 0.8
    centres[:4] = unit(x[:1]) * 0.9  # several centres on the duplicated point
    labels = balanced_assign(x, centres, neighbours=2)
    best, _ = optimal_cost(x, centres)
    assert assignment_cost(x, centres, labels) == pytest.approx(best, abs=1e-9)
    assert torch.equal(torch.bincount(labels, minlength=12), torch.full((12,), 16))


@pytest.mark.parametrize(("k", "n", "seed"), [(256, 4, 0), (256, 8, 1), (256, 16, 2), (192, 24, 3)])
def test_balanced_never_worse_than_iar_greedy(k: int, n: int, seed: int) -> None:
    x = codebook(k, seed=seed)
    labels, centres, greedy = iar_greedy_balanced_kmeans(x, n, iters=15, seed=seed)
    assert torch.equal(torch.bincount(labels, minlength=n), torch.full((n,), k // n))
    assert torch.equal(iar_greedy_balanced_kmeans(x, n, iters=15, seed=seed, fast_loops=True)[0], labels)
    # the assignment step: optimal, so never worse than the greedy one for the same centres
    step = iar_greedy_assign(x, centres)
    assert (
        assignment_cost(x, centres, balanced_assign(x, centres)) <= assignment_cost(x, centres, step) + 1e-9
    )
    # the whole method started where the greedy one stopped: every step lowers the objective
    assert balanced_kmeans(x, n, init=centres)[2] <= greedy + 1e-9


def test_balanced_beats_iar_greedy_on_average() -> None:
    """From its own start it is a local method too, so compare totals over seeds, not every seed."""
    ours = greedy = 0.0
    for seed in range(4):
        x = codebook(256, seed=10 + seed)
        ours += balanced_kmeans(x, 16, seed=seed)[2]
        greedy += iar_greedy_balanced_kmeans(x, 16, iters=30, seed=seed, fast_loops=True)[2]
    assert ours < greedy


def test_balanced_kmeans_is_a_fixed_point() -> None:
    """At convergence the labels are the optimal balanced assignment to their own means."""
    x = codebook(300, seed=5)
    info: dict = {}
    labels, centres, objective = balanced_kmeans(x, 20, seed=0, info=info)
    assert info["converged"]
    again = balanced_assign(x, centres)
    assert assignment_cost(x, centres, again) == pytest.approx(objective, abs=1e-9)


def test_kmeans_restarts_and_nearest_labels() -> None:
    x = codebook(400, seed=2)
    info: dict = {}
    labels, centres, objective = kmeans(x, 16, n_init=4, seed=0, info=info)
    _, _, single = kmeans(x, 16, n_init=1, seed=0)  # the same draws as the first of the four restarts
    assert objective <= single + 1e-12
    assert info["converged"]
    assert torch.equal(torch.cdist(unit(x), centres).argmin(1), labels)
    assert objective == pytest.approx(wcss(x, labels, 16), rel=1e-12)
    assert (torch.bincount(labels, minlength=16) > 0).all()


def test_determinism_under_seed() -> None:
    x = codebook(200, seed=4)
    for fn in (kmeans, balanced_kmeans):
        a = fn(x, 10, seed=7)
        b = fn(x, 10, seed=7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(random_clusters(200, 10, seed=7), random_clusters(200, 10, seed=7))
    assert not torch.equal(random_clusters(200, 10, seed=7), random_clusters(200, 10, seed=8))
    g1 = iar_greedy_balanced_kmeans(x, 10, iters=3, seed=1)[0]
    assert torch.equal(g1, iar_greedy_balanced_kmeans(x, 10, iters=3, seed=1)[0])


def test_random_clusters() -> None:
    balanced = random_clusters(120, 8, seed=0)
    assert torch.equal(torch.bincount(balanced), torch.full((8,), 15))
    free = random_clusters(100, 7, balanced=False, seed=0)
    assert free.shape == (100,) and (torch.bincount(free, minlength=7) > 0).all()


# ----------------------------------------------------------------------------- the result object


@pytest.mark.parametrize("method", ["kmeans", "balanced", "hierarchical", "random"])
def test_labels_perm_inverse_consistent(fitted, method: str) -> None:
    cb, c = fitted[method]
    k = cb.shape[0]
    perm, inverse = c.perm, c.inverse
    assert perm.dtype == inverse.dtype == torch.int64
    assert torch.equal(perm[inverse], torch.arange(k)) and torch.equal(inverse[perm], torch.arange(k))
    assert torch.equal(c.new_labels, c.labels[inverse])
    assert bool((c.new_labels[1:] >= c.new_labels[:-1]).all())
    start = 0
    for j in range(c.n_clusters):
        old = (c.labels == j).nonzero()[:, 0]  # ascending old ids
        assert torch.equal(perm[old], torch.arange(start, start + old.numel()))  # contiguous, in old-id order
        start += old.numel()
    assert int(c.sizes.sum()) == k
    assert c.codebook_fingerprint and c.method == method and c.seed == 3
    if method in ("kmeans", "hierarchical"):
        assert c.objective <= fitted["random"][1].objective
    else:
        assert c.is_balanced and c.block_size == 20


def test_iar_mapping_round_trip(fitted, tmp_path) -> None:
    cb, c = fitted["balanced"]
    mapping = c.to_iar_mapping()
    assert mapping.dtype == torch.int64 and mapping.shape == (240,)
    back = CodebookClusters.from_iar_mapping(mapping, cb, block_size=20)
    assert torch.equal(back.labels, c.labels) and torch.equal(back.perm, mapping)
    assert back.objective == pytest.approx(c.objective, rel=1e-9)
    # a mapping whose order inside the blocks is not ours survives import and export unchanged
    g = torch.Generator().manual_seed(0)
    foreign = torch.randperm(240, generator=g)
    torch.save(foreign, tmp_path / "mapping.pt")
    imported = CodebookClusters.from_iar_mapping(tmp_path / "mapping.pt", cb, block_size=20)
    assert torch.equal(imported.to_iar_mapping(), foreign)
    assert torch.equal(imported.labels, foreign // 20)
    assert torch.equal(imported.new_labels, torch.arange(240) // 20)
    imported.save(tmp_path / "imported.safetensors")
    assert torch.equal(CodebookClusters.load(tmp_path / "imported.safetensors").perm, foreign)


def test_save_load_round_trip(fitted, tmp_path) -> None:
    for method, (cb, c) in fitted.items():
        path = tmp_path / f"{method}.safetensors"
        c.save(path)
        d = CodebookClusters.load(path)
        assert torch.equal(d.labels, c.labels) and torch.equal(d.perm, c.perm)
        assert (d.n_clusters, d.method, d.objective, d.codebook_fingerprint, d.seed) == (
            c.n_clusters,
            c.method,
            c.objective,
            c.codebook_fingerprint,
            c.seed,
        )
        d.check_codebook(cb)


def test_check_codebook_refuses_another(fitted, tmp_path) -> None:
    cb, c = fitted["balanced"]
    c.save(tmp_path / "c.safetensors")
    loaded = CodebookClusters.load(tmp_path / "c.safetensors")
    other = cb.clone()
    other[5, 0] += 1e-3
    with pytest.raises(ClusterarError) as e:
        loaded.check_codebook(other)
    msg = str(e.value)
    assert "c.safetensors" in msg and c.codebook_fingerprint in msg and "Recompute" in msg
    with pytest.raises(ClusterarError, match="fingerprint"):
        permute_codebook(permute_rows(cb, c), c)  # an already rearranged codebook is refused too
    with pytest.raises(ClusterarError, match="100 codes"):
        c.check_codebook(cb[:100])


def test_permuted_lookup_is_identical(fitted) -> None:
    cb, c = fitted["balanced"]
    new_cb = permute_codebook(cb, c)
    tokens = torch.randint(0, 240, (4, 16), generator=torch.Generator().manual_seed(0))
    new_tokens = remap_tokens(tokens, c)
    assert new_tokens.dtype == tokens.dtype and new_tokens.shape == tokens.shape
    assert torch.equal(new_cb[new_tokens], cb[tokens])  # exact, not approximately
    assert torch.equal(unmap_tokens(new_tokens, c), tokens)
    assert torch.equal(c.new_labels[new_tokens], c.labels[tokens])
    as_np = tokens.numpy().astype(np.uint16)
    remapped = remap_tokens(as_np, c)
    assert remapped.dtype == np.uint16 and np.array_equal(remapped, new_tokens.numpy())
    emb = torch.randn(240, 5)
    assert torch.equal(permute_rows(emb, c)[new_tokens], emb[tokens])


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(fitted, tmp_path) -> None:
    cb = codebook(96)
    with pytest.raises(ClusterarError, match=r"not divisible by n_clusters=10.*8 or 12"):
        balanced_kmeans(cb, 10)
    with pytest.raises(ClusterarError, match="nearest valid"):
        CodebookClusters.fit(codebook(16384, seed=0)[:1000], "balanced", 128)
    for n in (0, -3, 97):
        with pytest.raises(ClusterarError, match="between 1 and"):
            kmeans(cb, n)
    with pytest.raises(ClusterarError, match="2-D"):
        kmeans(cb[0], 2)
    bad = cb.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ClusterarError, match="NaN"):
        CodebookClusters.fit(bad, "kmeans", 4)
    with pytest.raises(ClusterarError, match="unknown clustering method"):
        CodebookClusters.fit(cb, "spectral", 4)
    with pytest.raises(ClusterarError, match="not a permutation"):
        CodebookClusters.from_iar_mapping(torch.zeros(96, dtype=torch.long), cb, block_size=8)
    with pytest.raises(ClusterarError, match="96 codes"):
        CodebookClusters.from_iar_mapping(torch.arange(95), cb, block_size=5)
    with pytest.raises(ClusterarError, match="does not divide"):
        CodebookClusters.from_iar_mapping(torch.arange(96), cb, block_size=7)
    with pytest.raises(ClusterarError, match="not found"):
        CodebookClusters.from_iar_mapping(tmp_path / "missing.pt", cb, block_size=8)
    with pytest.raises(ClusterarError, match="equal-size"):
        fitted["kmeans"][1].to_iar_mapping()
    with pytest.raises(ClusterarError, match=r"\[0, 240\)"):
        remap_tokens(torch.tensor([0, 240]), fitted["balanced"][1])
    with pytest.raises(ClusterarError, match="integers"):
        remap_tokens(np.array([0.5]), fitted["balanced"][1])
    with pytest.raises(ClusterarError, match="rows"):
        permute_rows(torch.zeros(10, 3), fitted["balanced"][1])
    from clusterar.fileio import save_tensors

    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(2)}, {"kind": "token_file"})
    with pytest.raises(ClusterarError, match="not a clusters file"):
        CodebookClusters.load(tmp_path / "other.safetensors")


def test_hierarchical_cut_is_scipys_average_linkage_partition() -> None:
    """Exactly n clusters, the partition scipy's tree gives at n clusters, numbered by smallest code id."""
    from scipy.cluster.hierarchy import fcluster, linkage

    torch.manual_seed(3)
    cb = torch.randn(300, 6)
    for n in (1, 7, 40, 300):
        labels, objective = hierarchical(cb, n)
        assert labels.unique().numel() == n and int(labels.max()) == n - 1
        xn = torch.nn.functional.normalize(cb.double(), dim=1).numpy()
        want = fcluster(linkage(xn, method="average"), t=n, criterion="maxclust")  # no ties in random data
        same = (want[:, None] == want[None, :]) == (labels.numpy()[:, None] == labels.numpy()[None, :])
        assert same.all(), n
        firsts = [int((labels == c).nonzero()[0]) for c in range(n)]
        assert firsts == sorted(firsts) and firsts[0] == 0
        assert objective == pytest.approx(wcss(cb, labels, n))
    c = CodebookClusters.fit(cb, "hierarchical", 12)
    assert torch.equal(c.labels, CodebookClusters.fit(cb, "hierarchical", 12, seed=5).labels)  # no randomness
    assert c.method == "hierarchical" and c.n_clusters == 12 and not c.is_balanced


def test_hierarchical_exact_count_with_tied_merges() -> None:
    """Duplicated codes merge at height 0 in ties; the cut still gives exactly n clusters."""
    cb = torch.randn(20, 4).repeat(5, 1)  # 100 codes, 20 distinct
    for n in (5, 20, 37, 100):
        labels, _ = hierarchical(cb, n)
        assert labels.unique().numel() == n
    labels, _ = hierarchical(cb, 20)
    assert all(labels[i].item() == labels[i % 20].item() for i in range(100))  # copies together
