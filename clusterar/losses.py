"""Training losses and accuracies over token logits: plain CE, IAR's cluster-oriented CE.

A cluster's logit is the logsumexp of its members' token logits, so softmax over cluster logits is the
probability mass the model puts inside each cluster, and the cluster CE is -log(mass in the target's
cluster). IAR lays clusters out as contiguous id blocks (`cluster_ce_contiguous`, a reshape); the
general form (`cluster_ce`) takes any token -> cluster map, so it needs no id rearrangement and also
scores CTF's and the baseline's predictions on the same footing.

All functions take logits [..., K] and targets [...] (any leading shape) and compute in float32.

Training uses `fused_ce`: the token CE and, for IAR's contiguous clusters, the cluster CE from ONE
logsumexp over each row, with a hand-written backward (softmax minus the target terms), computed over
chunks of rows in float32 and never holding the whole [N, K] in float32: at LlamaGen's K = 16,384 a
batch of 64 x 256 tokens in bf16 would otherwise be copied to a 1 GB float32 tensor, and IAR's cluster CE
would take a second pass over every cluster of every row. The plain functions below are its reference
(tests/test_losses.py: equal values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ClusterarError


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != logits.shape[-1]:
        raise ClusterarError(
            f"cluster labels must be one id per token, shape [{logits.shape[-1]}], got {list(labels.shape)}"
        )


def cluster_logits(logits: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[..., K] token logits -> [..., n_clusters] cluster logits: logsumexp over each cluster's members.

    `labels` [K] maps token id -> cluster id. Each cluster subtracts its own max before exponentiating,
    so no cluster underflows however far its logits lie below the row's best. An empty cluster gets -inf.
    """
    _check_labels(logits, labels)
    k = logits.shape[-1]
    x = logits.float().reshape(-1, k)
    index = labels.to(device=x.device, dtype=torch.long).expand_as(x)
    cmax = torch.full((x.shape[0], n_clusters), float("-inf"), device=x.device)
    cmax = cmax.scatter_reduce(1, index, x.detach(), reduce="amax", include_self=True)
    cmax = torch.where(torch.isinf(cmax), torch.zeros_like(cmax), cmax)  # empty clusters (and inf logits)
    sums = torch.zeros_like(cmax).scatter_add(1, index, torch.exp(x - cmax.gather(1, index)))
    return (sums.log() + cmax).reshape(*logits.shape[:-1], n_clusters)


def cluster_logits_contiguous(logits: torch.Tensor, block: int) -> torch.Tensor:
    """Cluster logits when cluster c holds token ids [c*block, (c+1)*block) (IAR after rearrangement)."""
    k = logits.shape[-1]
    if block < 1 or k % block:
        raise ClusterarError(f"cluster block size {block} does not divide the vocabulary size {k}")
    return logits.float().reshape(*logits.shape[:-1], k // block, block).logsumexp(-1)


def cluster_ce(
    logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, n_clusters: int | None = None
) -> torch.Tensor:
    """IAR's cluster-oriented CE for any token -> cluster map `labels` [K]: mean -log P(target's cluster)."""
    n = n_clusters if n_clusters is not None else int(labels.max()) + 1
    z = cluster_logits(logits, labels, n)
    labels = labels.to(device=targets.device, dtype=torch.long)
    return F.cross_entropy(z.reshape(-1, n), labels[targets.reshape(-1)])


def cluster_ce_contiguous(logits: torch.Tensor, targets: torch.Tensor, block: int) -> torch.Tensor:
    """IAR's cluster-oriented CE, clusters of `block` contiguous ids: CE(cluster logits, target // block)."""
    z = cluster_logits_contiguous(logits, block)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1) // block)


def iar_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels_or_block: torch.Tensor | int,
    lam: float = 1.0,
    n_clusters: int | None = None,
) -> dict[str, torch.Tensor]:
    """IAR's objective L_TCE + lam * L_CCE. `labels_or_block` is a cluster block size (contiguous ids)
    or a label tensor [K]. Returns {"loss": total, "token_ce", "cluster_ce"}."""
    tce = token_ce(logits, targets)
    if isinstance(labels_or_block, int):
        cce = cluster_ce_contiguous(logits, targets, labels_or_block)
    else:
        cce = cluster_ce(logits, targets, labels_or_block, n_clusters)
    return {"loss": tce + lam * cce, "token_ce": tce, "cluster_ce": cce}


CHUNK_ELEMENTS = 2**24  # rows per chunk of `fused_ce` hold about this many logits (64 MB in float32)


class FusedCE(torch.autograd.Function):
    """(token CE, cluster CE) over [N, K] logits, both means over the N rows; see `fused_ce`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block: int, rows: int):
        n, k = logits.shape
        lse = torch.empty(n, device=logits.device, dtype=torch.float32)
        own_lse = torch.zeros_like(lse)  # logsumexp of the target's cluster block (block > 0)
        tce = torch.zeros((), device=logits.device, dtype=torch.float32)
        cce = torch.zeros_like(tce)
        for lo in range(0, n, rows):
            z, t = logits[lo : lo + rows].float(), targets[lo : lo + rows]
            lse[lo : lo + rows] = z.logsumexp(-1)
            tce += (lse[lo : lo + rows] - z.gather(1, t[:, None]).squeeze(1)).sum()
            if block:
                own = z.view(len(z), k // block, block).gather(
                    1, (t // block)[:, None, None].expand(-1, 1, block)
                )
                own_lse[lo : lo + rows] = own.squeeze(1).logsumexp(-1)
                cce += (lse[lo : lo + rows] - own_lse[lo : lo + rows]).sum()
        ctx.save_for_backward(logits, targets, lse, own_lse)
        ctx.block, ctx.rows = block, rows
        return tce / n, cce / n

    @staticmethod
    def backward(ctx, g_tce: torch.Tensor, g_cce: torch.Tensor):
        """d/dz of mean(lse - z_t) + mean(lse - lse_own): (g_tce + g_cce) softmax(z) - g_tce onehot(t)
        - g_cce softmax within the target's block, all over N."""
        logits, targets, lse, own_lse = ctx.saved_tensors
        block, rows = ctx.block, ctx.rows
        n, k = logits.shape
        chunks = []
        both = (g_tce + (g_cce if block else 0.0)) / n
        for lo in range(0, n, rows):
            z, t = logits[lo : lo + rows].float(), targets[lo : lo + rows]  # float(): no copy for float32
            g = (z - lse[lo : lo + rows, None]).exp_().mul_(both)  # softmax, scaled: one new [rows, K]
            g[torch.arange(len(z), device=z.device), t] -= g_tce / n
            if block:
                cols = (t // block * block)[:, None] + torch.arange(block, device=z.device)
                inside = (z.gather(1, cols) - own_lse[lo : lo + rows, None]).exp_()  # softmax in the block
                g.scatter_add_(1, cols, inside.mul_(-g_cce / n))
            chunks.append(g.to(logits.dtype))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks), None, None, None


def fused_ce(
    logits: torch.Tensor, targets: torch.Tensor, block: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token CE, IAR's cluster CE for clusters of `block` contiguous ids; 0 when block is 0), equal to
    `token_ce` and `cluster_ce_contiguous` in value and gradient, from one logsumexp per row (see the
    module docstring). Logits of any float dtype; the gradient comes back in that dtype."""
    k = logits.shape[-1]
    if block and (block < 1 or k % block):
        raise ClusterarError(f"cluster block size {block} does not divide the vocabulary size {k}")
    if not block and logits.dtype == torch.float32:  # nothing to fuse or to spare: PyTorch's CE is fastest
        return token_ce(logits, targets), logits.new_zeros((), dtype=torch.float32)
    rows = max(1, CHUNK_ELEMENTS // k)
    return FusedCE.apply(logits.reshape(-1, k), targets.reshape(-1), block, rows)


@torch.no_grad()
def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of positions whose argmax token is the target."""
    return (logits.argmax(-1) == targets).float().mean()


@torch.no_grad()
def cluster_accuracy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor | int,
    n_clusters: int | None = None,
) -> torch.Tensor:
    """Fraction of positions whose most probable cluster (argmax of cluster logits, i.e. of in-cluster
    probability mass) is the target's cluster. `labels` [K], or an int block size for contiguous ids."""
    if isinstance(labels, int):
        pred, true = cluster_logits_contiguous(logits, labels).argmax(-1), targets // labels
    else:
        n = n_clusters if n_clusters is not None else int(labels.max()) + 1
        labels = labels.to(device=targets.device, dtype=torch.long)
        pred, true = cluster_logits(logits, labels, n).argmax(-1), labels[targets]
    return (pred == true).float().mean()
