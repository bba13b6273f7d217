"""Training losses of the bundled model: the answer loss and the attention guidance loss."""

from __future__ import annotations

import torch

from vtoken.zoo.data import IGNORE_INDEX


def attention_guidance_loss(heads: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over cues of ``-log`` the attention mass on the evidence tokens (mean over heads) or,
    for cues marked ``spread``, of ``KL(uniform over the evidence || attention)`` in every head
    (mean over heads): a count cue must weigh each anchor and the sink alike (with the mass loss
    alone it put everything on the sink; with the KL on the head mean, two heads sat wholly on the
    sink, where the softmax passes no gradient, so the head mean never fell below half on the sink
    whatever the count).

    Args:
        heads: ``(K, H, T)`` attention probabilities of each cue (one decoder layer; see
            ``vtoken.zoo.attention_rows``).
        batch: with ``cues`` ``(K, 2)`` (row, query position), ``evidence`` ``(K, T)`` bool (every
            head alike) or ``(K, G, T)`` (per group of heads, see ``head_masks``) and optionally
            ``spread`` ``(K,)`` bool.

    Returns:
        Scalar loss.
    """
    heads = heads.float()
    evidence = head_masks(batch["evidence"], heads.shape[1])  # (K, 1 or H, T)
    losses = -torch.log((heads * evidence).sum(-1).mean(1).clamp_min(1e-6))  # (K,)
    spread = batch.get("spread")
    if spread is not None and spread.any():
        shown = evidence[spread]  # (S, 1 or H, T)
        n = shown.sum(-1)  # (S, 1 or H)
        logs = torch.log(heads[spread].clamp_min(1e-6)) * shown  # (S, H, T)
        kl = -logs.sum(-1) / n - torch.log(n.float())  # (S, H): KL(uniform || head), >= 0
        losses[spread] = kl.mean(-1)
    return losses.mean()


def head_masks(masks: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head target masks: ``(K, T)`` -> ``(K, 1, T)`` (every head alike); ``(K, G, T)`` ->
    ``(K, heads, T)``, head ``h`` taking group ``h * G // heads`` (consecutive heads share a group)."""
    if masks.dim() == 2:
        return masks[:, None]
    return masks[:, torch.arange(heads) * masks.shape[1] // heads]


def question_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each row's labelled tokens, then over rows.

    Args:
        logits: ``(B, T, V)`` next-token logits.
        labels: ``(B, T)`` target ids, ``-100`` where there is no loss.

    Returns:
        Scalar loss.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1)
    counts = (targets != IGNORE_INDEX).sum(1).clamp(min=1)  # (B,)
    return (ce.sum(1) / counts).mean()
