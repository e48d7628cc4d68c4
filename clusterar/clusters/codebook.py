"""The result of a codebook clustering and the id permutation it defines.

`CodebookClusters` holds a result (labels, sizes, the permutation that makes every cluster a contiguous id
block, and the fingerprint of the codebook it belongs to) and saves it as safetensors; the functions
below apply its permutation to tables indexed by token id and to token ids themselves. Training, sampling
and the file tools depend on this module, not on how the labels were fitted (`fit`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import load_torch_file
from ..errors import ClusterarError
from ..fileio import expect_kind, file_error, fingerprint, load_tensors, save_tensors
from .fit import CLUSTER_METHODS, balanced_kmeans, hierarchical, kmeans, random_clusters, unit_codebook, wcss

FORMAT = "codebook_clusters"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------- the result object


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise ClusterarError(f"{what} must be a tensor or array, got {type(x).__name__}") from e


def _check_codebook(codebook: Any) -> torch.Tensor:
    """The raw codebook as a tensor, after the checks every method needs (2-D, finite)."""
    codebook = _as_tensor(codebook, "codebook")
    unit_codebook(codebook)
    return codebook


@dataclass(eq=False)
class CodebookClusters:
    """A clustering of a codebook: labels phi (code -> cluster) and the id permutation derived from it.

    `perm` renumbers the codes so that every cluster is a contiguous block of ids (clusters in index order,
    within a cluster by old id; a mapping imported from IAR's file keeps its own order): new_id =
    perm[old_id], old_id = inverse[new_id]. The fingerprint ties the result to the exact codebook tensor it
    was computed on, so it is never applied to another one by mistake.
    """

    labels: torch.Tensor  # int64 [K]: cluster of each (old) code id
    n_clusters: int
    method: str  # "kmeans" | "balanced" | "random" | "iar-file" | ...
    objective: float  # WCSS of the L2-normalised codebook rows around their cluster means
    codebook_fingerprint: str
    seed: int | None = 0
    mapping: torch.Tensor | None = None  # explicit permutation (IAR's file), else derived from labels
    source: str | None = field(default=None, repr=False)  # file this was loaded from or saved to

    def __post_init__(self) -> None:
        labels = _as_tensor(self.labels, "labels")
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ClusterarError(
                f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        self.labels = labels.detach().to("cpu", torch.long).contiguous()
        self.n_clusters = int(self.n_clusters)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.n_clusters):
            raise ClusterarError(
                f"labels must lie in [0, {self.n_clusters}), got {int(self.labels.min())}..{int(self.labels.max())}"
            )
        if self.mapping is not None:
            self.mapping = _check_permutation(self.mapping, self.labels.numel(), "mapping")
            m = self.block_size
            if m is None or not torch.equal(self.mapping // m, self.labels):
                raise ClusterarError(
                    "mapping does not match the labels: cluster c must own new ids [c*m, (c+1)*m)"
                )

    # --- derived views

    @property
    def num_codes(self) -> int:
        return self.labels.numel()

    @property
    def sizes(self) -> torch.Tensor:
        """Members per cluster, int64 [n]."""
        return torch.bincount(self.labels, minlength=self.n_clusters)

    @property
    def is_balanced(self) -> bool:
        return self.num_codes % self.n_clusters == 0 and bool(
            (self.sizes == self.num_codes // self.n_clusters).all()
        )

    @property
    def block_size(self) -> int | None:
        """Codes per cluster (m) when all clusters have the same size, else None."""
        return self.num_codes // self.n_clusters if self.is_balanced else None

    @property
    def inverse(self) -> torch.Tensor:
        """old_id = inverse[new_id], int64 [K]."""
        if self.mapping is not None:
            return torch.argsort(self.mapping)
        return torch.argsort(self.labels, stable=True)

    @property
    def perm(self) -> torch.Tensor:
        """new_id = perm[old_id], int64 [K]: every cluster a contiguous block of new ids."""
        if self.mapping is not None:
            return self.mapping.clone()
        perm = torch.empty_like(self.labels)
        perm[self.inverse] = torch.arange(self.num_codes)
        return perm

    @property
    def new_labels(self) -> torch.Tensor:
        """Cluster of each NEW id (non-decreasing): labels[inverse]."""
        return self.labels[self.inverse]

    # --- constructors

    @classmethod
    def fit(
        cls, codebook: torch.Tensor, method: str, n_clusters: int, seed: int = 0, **kw: Any
    ) -> CodebookClusters:
        """Cluster `codebook` [K, D] (raw rows; normalised inside) with "kmeans" (CTF), "balanced" (IAR),
        "hierarchical" (average linkage, MASC) or "random" (the ablation; balanced=True by default). Extra
        keywords go to the algorithm."""
        if method not in CLUSTER_METHODS:
            raise ClusterarError(
                f"unknown clustering method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}"
            )
        codebook = _check_codebook(codebook)
        if method == "kmeans":
            labels, _, objective = kmeans(codebook, n_clusters, seed=seed, **kw)
        elif method == "balanced":
            labels, _, objective = balanced_kmeans(codebook, n_clusters, seed=seed, **kw)
        elif method == "hierarchical":  # deterministic: the seed is recorded, never used
            labels, objective = hierarchical(codebook, n_clusters, **kw)
        else:
            labels = random_clusters(codebook.shape[0], n_clusters, seed=seed, **kw)
            objective = wcss(codebook, labels, n_clusters)
        return cls(labels.cpu(), n_clusters, method, objective, fingerprint(codebook), seed)

    @classmethod
    def from_labels(
        cls,
        labels: torch.Tensor,
        codebook: torch.Tensor,
        method: str = "labels",
        n_clusters: int | None = None,
    ) -> CodebookClusters:
        """Wrap labels computed elsewhere (objective and fingerprint computed here)."""
        codebook = _check_codebook(codebook)
        labels = _as_tensor(labels, "labels")
        if labels.dim() != 1 or labels.numel() != codebook.shape[0]:
            raise ClusterarError(
                f"labels must have one entry per code ({codebook.shape[0]}), got {tuple(labels.shape)}"
            )
        n = int(labels.max()) + 1 if n_clusters is None else n_clusters
        out = cls(labels, n, method, 0.0, fingerprint(codebook), None)
        out.objective = wcss(codebook, out.labels, n)
        return out

    @classmethod
    def from_iar_mapping(
        cls, mapping: torch.Tensor | str | os.PathLike, codebook: torch.Tensor, block_size: int
    ) -> CodebookClusters:
        """Import IAR's published permutation: a 1-D int64 tensor [K] (or a .pt file holding one) with
        new_id = mapping[old_id]; cluster c owns new ids [c*m, (c+1)*m), so labels = mapping // m."""
        codebook = _check_codebook(codebook)
        k = codebook.shape[0]
        source = None
        if isinstance(mapping, (str, os.PathLike)):
            source = str(mapping)
            mapping = load_torch_file(mapping, "IAR mapping file")
        what = f"IAR mapping {source}" if source else "IAR mapping"
        mapping = _check_permutation(mapping, k, what)
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ClusterarError(f"block_size must be a positive integer, got {block_size!r}")
        if k % block_size:
            raise ClusterarError(
                f"block_size {block_size} does not divide the {k} codes; IAR's release uses 128"
            )
        n = k // block_size
        labels = mapping // block_size
        objective = wcss(codebook, labels, n)
        return cls(labels, n, "iar-file", objective, fingerprint(codebook), None, mapping, source)

    def to_iar_mapping(self) -> torch.Tensor:
        """IAR's format: 1-D int64 [K], new_id = mapping[old_id] (equal-size clusters only)."""
        if not self.is_balanced:
            sizes = self.sizes
            raise ClusterarError(
                f"IAR's mapping format needs equal-size clusters, but these {self.method} clusters have "
                f"{int(sizes.min())}..{int(sizes.max())} members; use method 'balanced'"
            )
        return self.perm

    def fingerprint(self) -> str:
        """Identity of this clustering (labels and id permutation): model files record it, so a model is never
        paired with other clusters than those it was trained with."""
        return fingerprint({"labels": self.labels, "perm": self.perm})

    # --- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (labels, and IAR's mapping if imported) with the metadata as JSON."""
        tensors = {"labels": self.labels}
        if self.mapping is not None:
            tensors["mapping"] = self.mapping
        meta = {
            "kind": FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "n_clusters": self.n_clusters,
            "num_codes": self.num_codes,
            "block_size": self.block_size,
            "objective": self.objective,
            "codebook_fingerprint": self.codebook_fingerprint,
            "seed": self.seed,
        }
        save_tensors(path, tensors, meta)
        self.source = str(path)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodebookClusters:
        tensors, meta = load_tensors(path, "clusters file")
        expect_kind(path, meta, FORMAT, "clusters file")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise ClusterarError(
                f"{path} was written by a newer clusterar (format {meta['version']}); upgrade"
            )
        if "labels" not in tensors:
            raise file_error(path, "clusters file", "has no 'labels' tensor", damaged=True)
        try:
            out = cls(
                tensors["labels"],
                meta["n_clusters"],
                meta["method"],
                float(meta["objective"]),
                meta["codebook_fingerprint"],
                meta.get("seed"),
                tensors.get("mapping"),
                str(path),
            )
        except KeyError as e:
            raise file_error(path, "clusters file", f"lacks the metadata field {e}", damaged=True) from e
        except ClusterarError as e:
            raise file_error(path, "clusters file", f"is inconsistent ({e})", damaged=True) from e
        return out

    def check_codebook(self, codebook: torch.Tensor, what: str = "codebook") -> None:
        """Refuse a codebook other than the one these clusters were computed on."""
        codebook = _as_tensor(codebook, what)
        got = fingerprint(codebook)
        if got == self.codebook_fingerprint:
            return
        where = f"the clusters in {self.source}" if self.source else "these clusters"
        shape = "x".join(map(str, codebook.shape))
        hint = (
            f" (it has {codebook.shape[0]} codes, the clusters {self.num_codes})"
            if codebook.dim() != 2 or codebook.shape[0] != self.num_codes
            else ""
        )
        raise ClusterarError(
            f"{where} were computed on codebook {self.codebook_fingerprint}, but the {what} given "
            f"({shape} {str(codebook.dtype).replace('torch.', '')}) has fingerprint {got}{hint}. Recompute the "
            "clusters on this codebook, or use the tokenizer they were computed for (an already rearranged "
            "codebook, or one cast to another dtype, also differs)"
        )


def _check_permutation(mapping: Any, k: int, what: str) -> torch.Tensor:
    mapping = _as_tensor(mapping, what)
    if mapping.dim() != 1 or mapping.is_floating_point() or mapping.dtype == torch.bool:
        raise ClusterarError(
            f"{what} must be a 1-D integer tensor, got {mapping.dtype} {tuple(mapping.shape)}"
        )
    if mapping.numel() != k:
        raise ClusterarError(f"{what} has {mapping.numel()} entries but the codebook has {k} codes")
    mapping = mapping.detach().to("cpu", torch.long).contiguous()
    seen = torch.bincount(mapping.clamp(0, k - 1), minlength=k)
    out_of_range = int(((mapping < 0) | (mapping >= k)).sum())
    if out_of_range or not bool((seen == 1).all()):
        missing = (seen == 0).nonzero()[:, 0]
        raise ClusterarError(
            f"{what} is not a permutation of 0..{k - 1}: {out_of_range} ids out of range, "
            f"{missing.numel()} new ids never used (first: {missing[:5].tolist()}), "
            f"{int((seen > 1).sum())} used more than once"
        )
    return mapping


# ----------------------------------------------------------------------------- applying the permutation


def permute_rows(weight: torch.Tensor, clusters: CodebookClusters) -> torch.Tensor:
    """Rows in the new id order: out[new_id] = weight[old_id] (i.e. weight[inverse]).

    For every table indexed by token id: the tokenizer codebook (see `permute_codebook`, which also checks
    the fingerprint) and the transformer's `tok_embeddings` and `output` rows.
    """
    if weight.dim() < 1 or weight.shape[0] != clusters.num_codes:
        raise ClusterarError(
            f"cannot permute a table of {tuple(weight.shape)} rows: the clusters cover {clusters.num_codes} ids"
        )
    return weight[clusters.inverse.to(weight.device)]


def permute_codebook(weight: torch.Tensor, clusters: CodebookClusters) -> torch.Tensor:
    """The codebook rows in the new id order, after checking that it is the codebook that was clustered."""
    clusters.check_codebook(weight)
    return permute_rows(weight, clusters)


def _lookup_ids(tokens: Any, table: torch.Tensor, what: str) -> Any:
    """table[tokens] for a torch tensor or numpy array of any shape, keeping its type and dtype."""
    k = table.numel()
    if isinstance(tokens, torch.Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ClusterarError(f"{what}: token ids must be integers, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ClusterarError(
                f"{what}: token ids must lie in [0, {k}), got {int(tokens.min())}..{int(tokens.max())}; "
                "were these tokens made by another tokenizer?"
            )
        return table.to(tokens.device)[tokens.long()].to(tokens.dtype)
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ClusterarError(f"{what}: token ids must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= k):
        raise ClusterarError(
            f"{what}: token ids must lie in [0, {k}), got {int(arr.min())}..{int(arr.max())}; "
            "were these tokens made by another tokenizer?"
        )
    return table.numpy()[arr].astype(arr.dtype, copy=False)


def remap_tokens(tokens: Any, clusters: CodebookClusters) -> Any:
    """Old ids -> new ids (perm[tokens]), any shape, same type and dtype."""
    return _lookup_ids(tokens, clusters.perm, "remap_tokens")


def unmap_tokens(tokens: Any, clusters: CodebookClusters) -> Any:
    """New ids -> old ids (inverse[tokens]), e.g. sampled ids before decoding with the original tokenizer."""
    return _lookup_ids(tokens, clusters.inverse, "unmap_tokens")
