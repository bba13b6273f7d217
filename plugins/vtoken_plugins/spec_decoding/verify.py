"""Verifying a draft tree with one target forward, and what is kept afterwards.

The tree's ``N`` nodes go through the target as one block of new tokens: node ``i`` sits at RoPE
position ``next_pos + depth(i)`` and attends to the committed cache entries (``key_valid``) and to
its own ancestors and itself (:meth:`.tree.Tree.ancestors`). Node ``i`` thus sees exactly the inputs,
context and position sequential decoding would give it if its path were right, so the target's
prediction at ``i`` is sequential decoding's next token after that path.

Greedy acceptance (EAGLE, SpecInfer): a node is right when its token equals the target's argmax at
its parent; the accepted nodes are those whose whole path is right. Siblings hold distinct tokens,
so they form one chain; its deepest node ``a`` gives the bonus token, the target's own prediction
there. Whatever the draft proposed, the committed tokens are sequential greedy decoding's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtoken.indexing import left_pack
from vtoken_plugins.spec_decoding.tree import Tree


def tree_mask(key_valid: Tensor, ancestors: Tensor) -> Tensor:
    """``(B, 1, N, T + N)`` bool: each node sees the valid committed keys ``(B, T)`` and its
    ancestors ``(B, N, N)``."""
    b, n, _ = ancestors.shape
    return torch.cat([key_valid[:, None, :].expand(b, n, -1), ancestors], -1)[:, None]


def tree_positions(next_pos: Tensor, depth: Tensor) -> Tensor:
    """Position ids of the nodes: ``next_pos`` ``(B,)`` or ``(A, B)`` (M-RoPE axes) plus each node's
    depth ``(B, N)``; text tokens advance every axis alike."""
    return next_pos[..., None] + depth


@dataclass
class Accepted:
    """The outcome of one verify step.

    Attributes:
        on_path: ``(B, N)`` bool, the root and the accepted nodes.
        count: ``(B,)`` accepted draft tokens. last: ``(B,)`` the deepest accepted node (0: none).
        bonus: ``(B,)`` the target's token after ``last``.
    """

    on_path: Tensor
    count: Tensor
    last: Tensor
    bonus: Tensor

    def commit_order(self) -> tuple[Tensor, Tensor]:
        """Per row the path's nodes, left-padded to the longest path: ``(B, m)`` node indices
        (padding points at the root) and ``(B, m)`` bool, True on real entries."""
        index, pad = left_pack(self.on_path)
        return index, ~pad


def greedy_accept(tree: Tree, ancestors: Tensor, predicted: Tensor) -> Accepted:
    """Accept the longest right path (see the module).

    Args:
        tree: the verified tree. ancestors: ``tree.ancestors()``. predicted: ``(B, N)`` the target's
            (processed) argmax at every node.
    """
    parent_pred = predicted.gather(1, tree.parent.clamp(min=0))
    right = (tree.tokens == parent_pred) | (tree.parent < 0)  # the root is committed already
    if tree.chain:  # ancestors are the prefix: the right prefix
        on_path = right.cumprod(1).bool()
    else:
        on_path = ~(ancestors & ~right[:, None, :]).any(-1)  # every ancestor-or-self right
    last = torch.where(on_path, tree.depth, -1).argmax(1)  # one accepted node per depth at most
    return Accepted(
        on_path=on_path,
        count=on_path.sum(1) - 1,
        last=last,
        bonus=predicted.gather(1, last[:, None]).squeeze(1),
    )


def keep_slots(on_path: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The ``width`` slots every row keeps of a verified block: its path, then its first other nodes
    as fillers (holes, masked from then on) so that all rows keep the same count.

    Returns:
        ``(B, width)`` sorted node indices and ``(B, width)`` bool, True on path nodes.
    """
    if bool(on_path[:, :width].all()):  # every path the same length from the root: a prefix
        return torch.arange(width, device=on_path.device).expand(len(on_path), width), on_path[:, :width]
    order = torch.sort((~on_path).to(torch.int8), dim=1, stable=True).indices[:, :width]  # path first
    index = order.sort(1).values
    return index, on_path.gather(1, index)


def sample_accept(tree: Tree, probs: Tensor) -> Accepted:
    """Recursive rejection sampling over the tree (SpecInfer's multi-step speculative sampling,
    Miao et al., 2024; EAGLE-2's ``evaluate_posterior``): the emitted tokens follow the target's
    distribution exactly.

    From the root, with residual ``p`` = the target's distribution at the current node, each child
    ``c`` (in draft-score order) is accepted with probability ``p(c) / sum(p)``; on rejection
    ``p(c)`` is set to 0. An accepted child becomes the current node (``p`` = its distribution);
    when every child is rejected, or at a leaf, the bonus token is drawn from the residual. With a
    deterministic draft each child is a point mass ``q = delta_c``, for which ``min(1, p/q)`` is
    ``p(c)`` and the residual ``max(p - q, 0)`` renormalised is ``p`` without ``c``: candidate ``i`` is
    emitted with probability ``prod_{j<i}(1 - p'_j) p'_i = p(c_i)``, and any other token ``y`` with
    ``p(y)``.

    Args:
        tree: the verified tree. probs: ``(B, N, V)`` the target's (processed) distribution at every node.
    """
    batch, size, _ = probs.shape
    rows = torch.arange(batch, device=probs.device)
    kids = _children_by_score(tree)  # (B, N, K)
    node = torch.zeros(batch, dtype=torch.long, device=probs.device)
    on_path = torch.zeros(batch, size, dtype=torch.bool, device=probs.device)
    on_path[:, 0] = True
    residual = probs[:, 0].clone()
    searching = torch.ones(batch, dtype=torch.bool, device=probs.device)
    for _ in range(int(tree.depth.max())):
        moved = torch.zeros_like(searching)
        for j in range(kids.shape[-1]):
            child = kids[rows, node, j]  # (B,)
            live = searching & ~moved & (child >= 0)
            token = tree.tokens.gather(1, child.clamp(min=0)[:, None])  # (B, 1)
            mass = residual.gather(1, token).squeeze(1)
            take = live & (torch.rand(batch, device=probs.device) * residual.sum(1) < mass)
            residual = torch.where((live & ~take)[:, None], residual.scatter(1, token, 0.0), residual)
            residual = torch.where(take[:, None], probs[rows, child.clamp(min=0)], residual)
            node = torch.where(take, child, node)
            on_path[rows[take], child[take]] = True
            moved |= take
        searching &= moved
    bonus = torch.multinomial(residual / residual.sum(1, keepdim=True), 1).squeeze(1)
    return Accepted(on_path=on_path, count=on_path.sum(1) - 1, last=node, bonus=bonus)


def _children_by_score(tree: Tree) -> Tensor:
    """``(B, N, K)`` each node's children, best draft score first, padded with -1."""
    batch, size = tree.tokens.shape
    order = torch.sort(tree.scores, dim=1, descending=True, stable=True).indices  # (B, N)
    parent = tree.parent.gather(1, order)  # parents of the nodes in score order
    is_child = parent[:, None, :] == torch.arange(size, device=parent.device)[None, :, None]  # (B, N, N)
    width = max(int(is_child.sum(-1).max()), 1)
    slot = torch.sort(is_child.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    kids = order[:, None, :].expand(-1, size, -1).gather(2, slot)
    return torch.where(is_child.gather(2, slot), kids, -1)
