"""Losses: token CE, IAR's cluster CE in its contiguous and arbitrary-label forms, accuracies."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clusterar import ClusterarError
from clusterar.losses import (
    cluster_accuracy,
    cluster_ce,
    cluster_ce_contiguous,
    cluster_logits,
    cluster_logits_contiguous,
    iar_loss,
    token_accuracy,
    token_ce,
)

pytestmark = pytest.mark.usefixtures("one_thread")


K, BLOCK = 48, 8  # 6 clusters of 8 ids


def batch(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, K, generator=g) * scale
    targets = torch.randint(0, K, (2, 5), generator=g)
    return logits, targets


def test_token_ce_is_mean_cross_entropy():
    logits, targets = batch()
    want = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(token_ce(logits, targets), want)
    assert abs(token_ce(torch.zeros(3, K), targets[0, :3]).item() - math.log(K)) < 1e-6


def test_contiguous_and_label_forms_agree():
    logits, targets = batch()
    labels = torch.arange(K) // BLOCK
    torch.testing.assert_close(
        cluster_logits(logits, labels, K // BLOCK), cluster_logits_contiguous(logits, BLOCK)
    )
    torch.testing.assert_close(
        cluster_ce(logits, targets, labels, K // BLOCK), cluster_ce_contiguous(logits, targets, BLOCK)
    )
    torch.testing.assert_close(
        cluster_ce(logits, targets, labels), cluster_ce_contiguous(logits, targets, BLOCK)
    )
    a = iar_loss(logits, targets, BLOCK)
    b = iar_loss(logits, targets, labels, n_clusters=K // BLOCK)
    for key in ("loss", "token_ce", "cluster_ce"):
        torch.testing.assert_close(a[key], b[key])
    # Gradients agree too.
    grads = []
    for lab in (BLOCK, labels):
        x = logits.clone().requires_grad_()
        iar_loss(x, targets, lab)["loss"].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_cluster_logits_match_definition():
    logits, _ = batch(1)
    labels = torch.randint(0, 7, (K,), generator=torch.Generator().manual_seed(3))
    labels[labels == 6] = 5  # cluster 6 left empty
    z = cluster_logits(logits, labels, 7)
    for c in range(6):
        torch.testing.assert_close(z[..., c], logits[..., labels == c].logsumexp(-1))
    assert torch.all(z[..., 6] == float("-inf"))
    # Empty clusters do not break the loss nor its gradient.
    x = logits.clone().requires_grad_()
    targets = torch.randint(0, K, (2, 5))
    cluster_ce(x, targets, labels, 7).backward()
    assert torch.isfinite(x.grad).all()


def test_permuting_ids_and_labels_leaves_loss_unchanged():
    logits, targets = batch(2)
    labels = torch.arange(K) // BLOCK
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(4))  # new_id = perm[old_id]
    new_logits = torch.empty_like(logits)
    new_logits[..., perm] = logits
    new_labels = torch.empty_like(labels)
    new_labels[perm] = labels
    new_targets = perm[targets]
    a = iar_loss(logits, targets, labels)
    b = iar_loss(new_logits, new_targets, new_labels)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(
        cluster_accuracy(logits, targets, labels), cluster_accuracy(new_logits, new_targets, new_labels)
    )


def test_cluster_ce_is_minus_log_in_cluster_mass():
    logits, targets = batch(5)
    labels = torch.randint(0, 5, (K,), generator=torch.Generator().manual_seed(6))
    probs = logits.softmax(-1)
    in_cluster = labels[None, None, :] == labels[targets][..., None]  # [2, 5, K]
    mass = (probs * in_cluster).sum(-1)
    for t in range(5):  # per position: exp(-L_CCE) is the softmax mass inside the target's cluster
        loss = cluster_ce(logits[:, t : t + 1], targets[:, t : t + 1], labels, 5)
        per_row = torch.stack(
            [cluster_ce(logits[i, t : t + 1], targets[i, t : t + 1], labels, 5) for i in range(2)]
        )
        torch.testing.assert_close(torch.exp(-per_row), mass[:, t])
        torch.testing.assert_close(loss, per_row.mean())
    blocks = torch.arange(K) // BLOCK
    mass = (probs * (blocks[None, None, :] == (targets // BLOCK)[..., None])).sum(-1)
    torch.testing.assert_close(cluster_ce_contiguous(logits, targets, BLOCK), -mass.log().mean())


def test_lambda_zero_is_token_ce():
    logits, targets = batch(7)
    out = iar_loss(logits, targets, BLOCK, lam=0.0)
    torch.testing.assert_close(out["loss"], token_ce(logits, targets))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits.reshape(-1, K), targets.reshape(-1)))
    out = iar_loss(logits, targets, BLOCK, lam=0.5)
    torch.testing.assert_close(out["loss"], out["token_ce"] + 0.5 * out["cluster_ce"])
    assert out["cluster_ce"] <= out["token_ce"]  # the target's cluster holds at least the target's mass


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_are_stable(scale):
    logits, targets = batch(8, scale=scale)
    labels = torch.randperm(K, generator=torch.Generator().manual_seed(9)) % 6
    for lab in (BLOCK, labels):
        x = logits.clone().requires_grad_()
        out = iar_loss(x, targets, lab)
        out["loss"].backward()
        assert all(torch.isfinite(v) for v in out.values())
        assert torch.isfinite(x.grad).all()
    # A cluster far below the best one keeps its exact (finite) logit rather than underflowing to -inf.
    x = torch.tensor([[0.0, 0.0, -1e4, -1e4]])
    z = cluster_logits(x, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(z, torch.tensor([[math.log(2), -1e4 + math.log(2)]]))
    assert abs(cluster_ce(x, torch.tensor([2]), torch.tensor([0, 0, 1, 1]), 2).item() - 1e4) < 1e-2


def test_accuracies():
    logits = torch.full((1, 3, K), -5.0)
    logits[0, 0, 3] = 5.0  # right token
    logits[0, 1, 9] = 5.0  # wrong token, same cluster as the target 10 (cluster 1)
    logits[0, 2, 40] = 5.0  # wrong cluster
    targets = torch.tensor([[3, 10, 20]])
    labels = torch.arange(K) // BLOCK
    assert token_accuracy(logits, targets).item() == pytest.approx(1 / 3)
    assert cluster_accuracy(logits, targets, labels).item() == pytest.approx(2 / 3)
    assert cluster_accuracy(logits, targets, BLOCK).item() == pytest.approx(2 / 3)
    # Cluster accuracy follows the in-cluster mass, not the best single token.
    spread = torch.zeros(1, 1, K)
    spread[0, 0, 0] = 1.0  # best token in cluster 0, but cluster 1 holds more mass
    spread[0, 0, BLOCK : 2 * BLOCK] = 0.9
    assert cluster_accuracy(spread, torch.tensor([[BLOCK]]), BLOCK).item() == 1.0


def test_bad_labels_and_blocks():
    logits, targets = batch()
    with pytest.raises(ClusterarError, match="divide"):
        cluster_ce_contiguous(logits, targets, 5)
    with pytest.raises(ClusterarError, match="one id per token"):
        cluster_ce(logits, targets, torch.zeros(K - 1, dtype=torch.long))


# ----------------------------------------------------------------------------- the fused training loss


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_fused_ce_equals_the_plain_losses_in_value_and_gradient(monkeypatch, chunk_rows):
    """`fused_ce` (one logsumexp per row, a hand-written backward, chunks of rows) is token_ce and
    cluster_ce_contiguous: the same values and the same gradient for any weights of the two parts."""
    from clusterar import losses

    if chunk_rows is not None:  # 300 rows in chunks of 7: the last chunk is short
        monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 512 * chunk_rows)
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(300, 512, generator=gen)).requires_grad_()
    t = torch.randint(512, (300,), generator=gen)
    tce, cce = losses.fused_ce(x, t, 32)
    ref_t, ref_c = losses.token_ce(x, t), losses.cluster_ce_contiguous(x, t, 32)
    torch.testing.assert_close(tce, ref_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(cce, ref_c, rtol=0, atol=1e-5)
    for wt, wc in ((1.0, 0.0), (0.0, 1.0), (0.7, 1.3)):
        (g,) = torch.autograd.grad(wt * losses.fused_ce(x, t, 32)[0] + wc * losses.fused_ce(x, t, 32)[1], x)
        (ref,) = torch.autograd.grad(wt * ref_t + wc * ref_c, x, retain_graph=True)
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-8)
    tce, cce = losses.fused_ce(x, t)  # no clusters: the token CE alone
    assert cce.item() == 0.0
    (g,) = torch.autograd.grad(tce, x)
    torch.testing.assert_close(g, torch.autograd.grad(losses.token_ce(x, t), x)[0], rtol=0, atol=1e-8)


def test_fused_ce_takes_bf16_logits_and_masked_ones():
    """bf16 logits (CUDA autocast) are read in float32 chunk by chunk and their gradient comes back in
    bf16; -inf logits (CTF's refiner restricted to a cluster) give zero gradient there."""
    from clusterar.losses import fused_ce, token_ce

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=gen)
    t = torch.randint(256, (64,), generator=gen)
    xb = x.bfloat16().requires_grad_()
    tce, _ = fused_ce(xb, t, 16)
    ref = x.bfloat16().float().requires_grad_()
    torch.testing.assert_close(tce, token_ce(ref, t), rtol=0, atol=1e-5)
    (g,) = torch.autograd.grad(tce, xb)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), torch.autograd.grad(token_ce(ref, t), ref)[0], rtol=1e-2, atol=1e-5)

    masked = x.clone()
    masked[:, 128:] = float("-inf")
    t = t % 128
    m = masked.requires_grad_()
    tce, _ = fused_ce(m, t)
    (g,) = torch.autograd.grad(tce, m)
    assert torch.isfinite(tce) and (g[:, 128:] == 0).all()
    ref = masked[:, :128].detach().requires_grad_()
    torch.testing.assert_close(tce, token_ce(ref, t), rtol=0, atol=1e-5)


def test_fused_ce_refuses_a_block_that_does_not_divide_the_vocabulary():
    from clusterar.losses import fused_ce

    with pytest.raises(ClusterarError, match="block size 30 does not divide the vocabulary size 512"):
        fused_ce(torch.zeros(2, 512), torch.zeros(2, dtype=torch.long), 30)
