"""Clusters of a VQ codebook: fitting them, the id permutation they define, and the tools around it.

- `fit`: k-means (CTF), balanced k-means (IAR) with its exact equal-size assignment, hierarchical
  (average linkage, MASC), random clusters;
- `codebook`: `CodebookClusters` (the result and its file) and the permutation of rows and token ids;
- `rearrange`: rearranged tokenizers and token files (IAR's on-disk layout), IAR's mapping file;
- `inspect`: `clusterar cluster inspect`, the same-/other-cluster token swap experiment and plots.

The names below are the ones the rest of clusterar imports from here; `rearrange` and `inspect` load the
tokenizer and data modules, so they are imported from their own modules, not re-exported.
"""

from .codebook import CodebookClusters, permute_codebook, permute_rows, remap_tokens, unmap_tokens
from .fit import (
    CLUSTER_METHODS,
    UNEQUAL_METHODS,
    balanced_assign,
    balanced_kmeans,
    check_n_clusters,
    hierarchical,
    kmeans,
    random_clusters,
    wcss,
)

__all__ = [
    "CLUSTER_METHODS",
    "UNEQUAL_METHODS",
    "CodebookClusters",
    "balanced_assign",
    "balanced_kmeans",
    "check_n_clusters",
    "hierarchical",
    "kmeans",
    "permute_codebook",
    "permute_rows",
    "random_clusters",
    "remap_tokens",
    "unmap_tokens",
    "wcss",
]
