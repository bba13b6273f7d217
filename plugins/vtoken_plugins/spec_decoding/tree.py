"""EAGLE-2's dynamic draft tree (Li et al., 2024, section 4), vectorised over the rows of a batch.

From the root (the last committed token) the draft proposes ``top_k`` children; a node's score is
the sum of the draft's log-probabilities along its path. At each further level the ``top_k`` best
nodes of the previous level (the frontier) are run through the draft in one forward and each
proposes ``top_k`` children: all ``top_k**2`` become candidates, the best ``top_k`` the next frontier.
Finally every candidate is reranked and the best ``total_tokens - 1`` are kept. Scores never rise
along a path, and a stable sort over nodes stored level by level puts a parent before its child even
at equal scores (a saturated softmax gives log-probability 0), so the kept set is a tree. A chain is
the same with ``top_k = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# step(tokens (B, k), features (B, k, D), level, visible (B, k, E) | None) -> hidden (B, k, D): run
# the draft on the frontier (level = its depth); each new entry sees the earlier entries ``visible``
# marks (its ancestors; None: every one, a chain) and itself.
# logp(hidden (B, q, D)) -> (B, q, V) log-probabilities.
DraftStep = Callable[[Tensor, Tensor, int, Tensor | None], Tensor]
LogProbs = Callable[[Tensor], Tensor]


@dataclass
class Tree:
    """A batch of draft trees with the same node count ``N``; node 0 is the root.

    Attributes:
        tokens: ``(B, N)`` token of each node. parent: ``(B, N)`` index of the parent (-1 at the root).
        depth: ``(B, N)`` depth (0 at the root). Nodes are ordered so that a parent precedes its children.
        scores: ``(B, N)`` the draft's path log-probability (0 at the root).
    """

    tokens: Tensor
    parent: Tensor
    depth: Tensor
    scores: Tensor
    chain: bool = False

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def ancestors(self) -> Tensor:
        """``(B, N, N)`` bool, ``[b, i, j]`` True when node ``j`` is ``i`` or one of its ancestors:
        the tree attention mask among the nodes."""
        b, n = self.tokens.shape
        if self.chain:
            return torch.ones(n, n, dtype=torch.bool, device=self.tokens.device).tril().expand(b, n, n)
        eye = torch.eye(n, dtype=torch.bool, device=self.tokens.device).expand(b, n, n)
        up = torch.zeros(b, n, n + 1, dtype=torch.bool, device=self.tokens.device)
        up.scatter_(2, self.parent.masked_fill(self.parent < 0, n)[..., None], True)
        step = up[..., :n].float()  # (B, N, N) one hop up
        anc, hop = eye.clone(), step
        for _ in range(int(self.depth.max())):
            anc |= hop.bool()
            hop = hop @ step
        return anc

    def paths(self) -> Tensor:
        """Retrieval indices ``(B, N, max_depth + 1)``: for every node, the node indices from the root
        to it, padded with -1 (the rows of leaves are the candidate continuations)."""
        anc = self.ancestors()
        width = int(self.depth.max()) + 1
        slot = torch.where(anc, self.depth[:, None, :], width)  # (B, N, N) depth of each ancestor
        out = torch.full((*anc.shape[:2], width + 1), -1, dtype=torch.long, device=anc.device)
        index = torch.arange(anc.shape[-1], device=anc.device).expand_as(anc)
        out.scatter_(2, slot, index)
        return out[..., :width]

    def leaves(self) -> Tensor:
        """``(B, N)`` bool, True at nodes without children."""
        has_child = torch.zeros_like(self.tokens, dtype=torch.bool)
        has_child.scatter_(1, self.parent.clamp(min=0), self.parent >= 0)
        return ~has_child


def draft_tree(
    root: Tensor,
    root_hidden: Tensor,
    step: DraftStep,
    logp: LogProbs,
    top_k: int,
    depth: int,
    total: int,
    stop_below: float = 0.0,
    active: Tensor | None = None,
) -> Tree:
    """Draft one tree per row (see the module).

    Args:
        root: ``(B,)`` the last committed tokens. root_hidden: ``(B, D)`` the draft's output there.
        step, logp: the draft (see ``DraftStep``). top_k, depth, total: the tree's shape.
        stop_below, active: a chain's early stop (see :func:`_draft_chain`).

    Returns:
        A :class:`Tree` of ``min(total, 1 + pool size)`` nodes.
    """
    if top_k == 1 or depth == 0:
        return _draft_chain(root, root_hidden, step, logp, depth, stop_below, active)
    batch = root.shape[0]
    scores, tokens = logp(root_hidden[:, None])[:, 0].topk(top_k, -1)  # (B, k)
    pool_tokens, pool_scores = [tokens], [scores]
    pool_parent = [torch.full_like(tokens, -1)]
    levels = [1] * top_k
    frontier = torch.arange(top_k, device=root.device).expand(batch, top_k)  # pool indices (B, k)
    features = root_hidden[:, None].expand(-1, top_k, -1)  # (B, k, D): their parents' outputs
    visible = torch.zeros(batch, top_k, 0, dtype=torch.bool, device=root.device)
    for level in range(1, depth):
        entries = visible.shape[-1]
        hidden = step(tokens, features, level, visible)  # (B, k, D)
        child_scores, child_tokens = logp(hidden).topk(top_k, -1)  # (B, k, k)
        child_scores = child_scores + scores[..., None]
        base = sum(t.shape[1] for t in pool_tokens)
        pool_tokens.append(child_tokens.flatten(1))
        pool_scores.append(child_scores.flatten(1))
        pool_parent.append(frontier[..., None].expand(-1, -1, top_k).flatten(1))
        levels += [level + 1] * top_k * top_k
        scores, best = child_scores.flatten(1).topk(top_k, -1)  # (B, k) the next frontier
        parent_slot = best // top_k  # which frontier node each comes from
        tokens = child_tokens.flatten(1).gather(1, best)
        frontier = base + best
        features = hidden.gather(1, parent_slot[..., None].expand(-1, -1, hidden.shape[-1]))
        own = torch.eye(top_k, dtype=torch.bool, device=root.device)[None].expand(batch, -1, -1)  # (B, k, k)
        seen = torch.cat([visible, own], -1)  # what each expanded node sees, itself included
        visible = seen.gather(1, parent_slot[..., None].expand(-1, -1, entries + top_k))
    return _rerank(
        root, torch.cat(pool_tokens, 1), torch.cat(pool_scores, 1), torch.cat(pool_parent, 1),
        torch.tensor(levels, device=root.device), total,
    )  # fmt: skip


def _draft_chain(
    root: Tensor,
    hidden: Tensor,
    step: DraftStep,
    logp: LogProbs,
    depth: int,
    stop_below: float = 0.0,
    active: Tensor | None = None,
) -> Tree:
    """A tree of width 1: the draft's greedy continuation, at most ``depth`` tokens long (0: the root
    alone, a plain decoding step).

    With ``stop_below`` > 0 the chain ends early (a dynamic draft length): once the draft's
    probability of its whole chain so far (the product over its tokens, EAGLE-2's path score),
    averaged over the ``active`` ``(B,)`` rows, falls below ``stop_below``. That mean is the
    expected share of rows whose drafts are all still right, so it weighs what one more draft step
    can still bring against its cost, the same for every row of the batch. The last drafted token
    is verified; nothing is drafted after it.
    """
    batch = root.shape[0]
    tokens, scores = [root], [torch.zeros(batch, device=root.device)]
    hidden = hidden[:, None]  # (B, 1, D)
    live = [True] * batch if active is None else active.tolist()
    for level in range(1, depth + 1):
        score, token = logp(hidden)[:, 0].max(-1)  # (B,)
        tokens.append(token)
        scores.append(scores[-1] + score)
        if level == depth or (stop_below > 0 and _unlikely(scores[-1], stop_below, live)):
            break
        hidden = step(token[:, None], hidden, level, None)
    index = torch.arange(len(tokens), device=root.device).expand(batch, -1)
    return Tree(torch.stack(tokens, 1), index - 1, index, torch.stack(scores, 1), chain=True)


def _unlikely(path: Tensor, stop_below: float, live: list[bool]) -> bool:
    """Whether the mean over the ``live`` rows of the chains' path probabilities (``exp`` of the
    path log-probabilities ``path`` ``(B,)``) is below ``stop_below`` (read back once, on the host)."""
    probs = [math.exp(p) for p, on in zip(path.tolist(), live) if on]
    return not probs or sum(probs) / len(probs) < stop_below


def _rerank(root: Tensor, tokens: Tensor, scores: Tensor, parent: Tensor, levels: Tensor, total: int) -> Tree:
    """Keep the ``total - 1`` best pool nodes per row, ordered by pool index (parents first)."""
    batch, size = tokens.shape
    keep = min(total - 1, size)
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    chosen = ranked.sort(1).values  # (B, keep) pool indices, level by level
    tree_index = torch.zeros(batch, size + 1, dtype=torch.long, device=tokens.device)  # slot `size`: the root
    tree_index.scatter_(1, chosen, torch.arange(1, keep + 1, device=tokens.device).expand(batch, keep))
    parents = parent.gather(1, chosen)
    node_parent = tree_index.gather(1, parents.masked_fill(parents < 0, size))
    zero = torch.zeros(batch, 1, dtype=torch.long, device=tokens.device)
    return Tree(
        tokens=torch.cat([root[:, None], tokens.gather(1, chosen)], 1),
        parent=torch.cat([zero - 1, node_parent], 1),
        depth=torch.cat([zero, levels[chosen]], 1),
        scores=torch.cat([zero.to(scores.dtype), scores.gather(1, chosen)], 1),
    )
