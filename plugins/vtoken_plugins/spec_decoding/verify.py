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
    order = torch.sort((~on_path).to(torch.int8), dim=1, stable=True).indices[:, :width]  # path first
    index = order.sort(1).values
    return index, on_path.gather(1, index)
