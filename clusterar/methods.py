"""What each training method feeds the transformer and what it scores: baseline, IAR, CTF's two stages.

The trainer is one loop for all four methods; a `Method` turns a batch of ORIGINAL token ids (as token
files store them) into model inputs and targets, and computes the loss and the accuracies:

- baseline:    causal AR over the original ids; token CE.
- iar:         ids remapped on the fly to the rearranged space (new = perm[old]) so every cluster is a
               contiguous block; token CE + lambda * cluster CE (a reshape). `rearrange=False` keeps the
               original ids and uses the segment (arbitrary-label) cluster CE: the same loss value.
- ctf-coarse:  CTF stage 1, causal AR over coarse labels phi(t) (vocabulary M).
- ctf-refiner: CTF stage 2, bidirectional: reads the whole coarse sequence of a real image, predicts
               every fine token in one pass; `restrict_to_cluster` masks the logits outside each
               position's cluster (the sampler applies the same mask, see `restrict_logits`).

Every method logs the same accuracies so runs compare on one footing: `acc_token` (argmax fine token is
the target; not defined for ctf-coarse, which never predicts fine tokens) and `acc_cluster` (the most
probable cluster is the target's; for ctf-coarse that is its coarse accuracy). Accuracies need a
clusters file; the baseline takes one for logging only.

The rules of the methods live here once, as static methods of `Method` that training, `clusterar
convert`, experiment specs and the sampler all ask: which methods need clusters (`check_clusters_given`),
IAR's rearranged ids need equal-size clusters (`check_equal_size`), and restrict_to_cluster belongs to
CTF's refiner, which must be sampled as it was trained (`check_restrict_to_cluster`, `sampling_restricted`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .clusters import UNEQUAL_METHODS, CodebookClusters
from .errors import ClusterarError
from .gpt import GPTConfig, gpt_preset
from .losses import cluster_accuracy, fused_ce, iar_loss, token_accuracy

if TYPE_CHECKING:
    from .model_file import ModelInfo

TRAIN_METHODS = ("baseline", "iar", "ctf-coarse", "ctf-refiner")


def restrict_logits(logits: torch.Tensor, coarse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fine-token logits [..., K] with every token outside its position's coarse cluster set to -inf.

    `coarse` [...] holds the cluster of each position, `labels` [K] the cluster of each (original) token
    id. A CTF refiner trained with --restrict-to-cluster must be sampled with the same mask.
    """
    labels = labels.to(device=logits.device, dtype=torch.long)
    outside = labels != coarse.to(logits.device).unsqueeze(-1)
    return logits.masked_fill(outside, float("-inf"))


@dataclass
class Method:
    """One training method bound to its clusters (lookup tables live on the training device)."""

    name: str
    codebook_size: int
    clusters: CodebookClusters | None = None
    cluster_weight: float = 1.0
    rearrange: bool = True
    restrict_to_cluster: bool = False

    def __post_init__(self) -> None:
        if self.name not in TRAIN_METHODS:
            raise ClusterarError(f"unknown --method {self.name!r}; choose one of {', '.join(TRAIN_METHODS)}")
        c = self.clusters
        Method.check_clusters_given(self.name, c is not None)
        if c is not None and c.num_codes != self.codebook_size:
            raise ClusterarError(
                f"the clusters in {c.source or 'the clusters file'} cover {c.num_codes} codes, but the token "
                f"file's codebook has {self.codebook_size}; cluster the tokenizer that made these tokens"
            )
        if c is not None:
            Method.check_equal_size(self.name, c, self.rearrange)
        Method.check_restrict_to_cluster(self.name, self.restrict_to_cluster)
        if self.cluster_weight < 0:
            raise ClusterarError(f"--cluster-weight must be >= 0, got {self.cluster_weight}")
        self._labels = c.labels if c is not None else None  # phi: original id -> cluster
        self._perm = c.perm if (c is not None and self.name == "iar" and self.rearrange) else None

    # ---------------------------------------------------------------- the rules of each method
    #
    # Static, so that they hold wherever a method is named: training (a `Method`), `clusterar convert` and
    # an experiment spec (which name "ctf" for both stages, before any clusters file exists), and sampling.
    # The messages name the command line's flags; a caller that names the settings otherwise passes its own
    # words for them (the spec: its keys), and adds where the setting sits.

    @staticmethod
    def needs_clusters(method: str) -> bool:
        """Every method but the baseline trains against clusters of the codebook (the baseline takes a
        clusters file for its logged cluster accuracy only)."""
        return method != "baseline"

    @staticmethod
    def check_clusters_given(
        method: str, given: bool, *, method_key: str = "--method", clusters_key: str = "--clusters FILE"
    ) -> None:
        """Refuse a method that needs clusters (`needs_clusters`) when none are given."""
        if Method.needs_clusters(method) and not given:
            kind = "balanced" if method == "iar" else "k-means or hierarchical"
            raise ClusterarError(
                f"{method_key} {method} needs {clusters_key}: {kind} clusters of the tokenizer's codebook "
                "(`clusterar cluster fit`)"
            )

    @staticmethod
    def check_equal_size(
        method: str,
        clusters: CodebookClusters | str,
        rearrange: bool = True,
        *,
        no_rearrange: str | None = "pass --no-rearrange",
    ) -> None:
        """IAR on rearranged ids gives every cluster a block of m consecutive ids, so the clusters must all
        have m codes. `clusters` is a loaded file, or the name of the algorithm that will make them (a spec:
        `clusters.UNEQUAL_METHODS` make unequal ones). `no_rearrange` says how to train on the original ids
        instead (with the segment cluster loss), None where that is not offered (convert)."""
        if method != "iar" or not rearrange:
            return
        if isinstance(clusters, str):
            if clusters not in UNEQUAL_METHODS:
                return
            detail = f"{clusters} clusters have unequal sizes"
        else:
            if clusters.is_balanced:
                return
            sizes = clusters.sizes
            detail = (
                f"{clusters.source or 'the clusters'} ({clusters.method}) has clusters of "
                f"{int(sizes.min())}..{int(sizes.max())} codes"
            )
        alternative = f", or {no_rearrange} to use the segment cluster loss" if no_rearrange else ""
        raise ClusterarError(
            f"IAR's rearranged ids need equal-size clusters, but {detail}; use balanced or random clusters "
            f"(`clusterar cluster fit --method balanced`){alternative}"
        )

    @staticmethod
    def check_restrict_to_cluster(
        method: str,
        restrict: bool,
        *,
        key: str = "--restrict-to-cluster",
        refiner: str = "--method ctf-refiner",
    ) -> None:
        """Only CTF's refiner predicts fine tokens from known clusters, so only it can be masked to them."""
        if restrict and method != "ctf-refiner":
            raise ClusterarError(f"{key} only applies to {refiner}")

    @staticmethod
    def sampling_restricted(asked: bool | None, trained: bool, has_refiner: bool, source: str) -> bool:
        """Whether stage 2 samples inside each position's cluster: when `asked`, and always for a refiner
        `trained` with the mask (its logits outside the cluster were never trained). `asked` None: as
        trained."""
        if asked is False and trained:
            raise ClusterarError(
                f"the refiner of {source} was trained with restrict_to_cluster; it must be sampled with the "
                "same mask"
            )
        if asked and not has_refiner:
            raise ClusterarError("restrict_to_cluster only applies to CTF pipelines")
        return bool(asked) or trained

    @classmethod
    def from_info(
        cls, info: ModelInfo, codebook_size: int, clusters: CodebookClusters | None = None
    ) -> Method:
        """The method a model file was trained with (its cluster weight, id space and mask)."""
        return cls(
            info.method,
            codebook_size,
            clusters,
            cluster_weight=info.cluster_weight if info.cluster_weight is not None else 1.0,
            rearrange=info.rearranged,
            restrict_to_cluster=info.restrict_to_cluster,
        )

    # ---------------------------------------------------------------- description

    @property
    def n_clusters(self) -> int | None:
        return self.clusters.n_clusters if self.clusters is not None else None

    @property
    def id_space(self) -> str:
        """What the model's token ids mean: 'rearranged' (perm[old]), 'original', or 'coarse' (phi)."""
        if self.name == "ctf-coarse":
            return "coarse"
        return "rearranged" if self._perm is not None else "original"

    @property
    def causal(self) -> bool:
        return self.name != "ctf-refiner"

    @property
    def input_vocab(self) -> int:
        return self.n_clusters if self.name.startswith("ctf") else self.codebook_size

    @property
    def output_vocab(self) -> int:
        return self.n_clusters if self.name == "ctf-coarse" else self.codebook_size

    def model_config(
        self,
        preset: str,
        grid_size: int,
        num_classes: int,
        class_dropout: float = 0.1,
        dropout: float | None = None,
    ) -> GPTConfig:
        """The preset with vocabularies, grid, classes and causality set for this method and data."""
        overrides = dict(
            vocab_size=self.output_vocab,
            input_vocab_size=self.input_vocab,
            grid_size=grid_size,
            num_classes=num_classes,
            causal=self.causal,
            class_dropout=class_dropout,
        )
        if dropout is not None:
            overrides.update(token_dropout=dropout, resid_dropout=dropout, ffn_dropout=dropout)
        return gpt_preset(preset, **overrides)

    def to(self, device: torch.device) -> Method:
        """Move the lookup tables to the training device (once, not per batch)."""
        if self._labels is not None:
            self._labels = self._labels.to(device)
        if self._perm is not None:
            self._perm = self._perm.to(device)
        return self

    # ---------------------------------------------------------------- batches

    def prepare(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Original ids [B, N] -> (model input ids, targets, coarse labels [B, N] or None)."""
        coarse = self._labels[codes] if self._labels is not None else None
        if self.name == "ctf-coarse":
            return coarse[:, :-1], coarse, coarse
        if self.name == "ctf-refiner":
            return coarse, codes, coarse
        ids = self._perm[codes] if self._perm is not None else codes
        return ids[:, :-1], ids, coarse

    def _logits(self, logits: torch.Tensor, coarse: torch.Tensor | None) -> torch.Tensor:
        if self.restrict_to_cluster:
            return restrict_logits(logits, coarse, self._labels)
        return logits

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, coarse: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """{"loss": the training objective, plus its parts for IAR ("token_ce", "cluster_ce")}."""
        logits = self._logits(logits, coarse)
        if self.name != "iar":
            return {"loss": fused_ce(logits, targets)[0]}
        if self._perm is not None:  # contiguous clusters: both CEs from one pass (`losses.fused_ce`)
            tce, cce = fused_ce(logits, targets, self.clusters.block_size)
            return {"loss": tce + self.cluster_weight * cce, "token_ce": tce, "cluster_ce": cce}
        return iar_loss(logits, targets, self._labels, self.cluster_weight, self.n_clusters)

    @torch.no_grad()
    def metrics(
        self, logits: torch.Tensor, targets: torch.Tensor, coarse: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """{"acc_token", "acc_cluster"} where defined (see the module docstring)."""
        logits = self._logits(logits, coarse)
        if self.name == "ctf-coarse":
            return {"acc_cluster": token_accuracy(logits, targets)}
        out = {"acc_token": token_accuracy(logits, targets)}
        if self._perm is not None:
            out["acc_cluster"] = cluster_accuracy(logits, targets, self.clusters.block_size)
        elif self._labels is not None:
            out["acc_cluster"] = cluster_accuracy(logits, targets, self._labels, self.n_clusters)
        return out

    def metric_names(self) -> list[str]:
        """The keys `loss` and `metrics` return, in a fixed order (for one all-reduce per step)."""
        names = ["loss"] + (["token_ce", "cluster_ce"] if self.name == "iar" else [])
        if self.name != "ctf-coarse":
            names.append("acc_token")
        if self._labels is not None:
            names.append("acc_cluster")
        return names
