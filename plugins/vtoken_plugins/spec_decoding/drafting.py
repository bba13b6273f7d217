"""The draft at decoding time: its own KV cache, tree steps and commits.

The draft cache holds one entry per committed token (and per visual slot): keys and values
``(B, H_kv, S, d)`` in a :class:`~.draft.KVBuffer` (written in place), ``valid (B, S)`` (False on
padding and on the holes rows of a batch leave when they commit fewer tokens than others) and each
row's next draft position. Tree steps append temporary entries that :meth:`Drafter.commit` drops
before appending the accepted tokens again with the target's true features (EAGLE's rule), so
rollback is always a suffix cut (a shorter filled length).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtoken_plugins.spec_decoding.draft import DraftModel, KVBuffer
from vtoken_plugins.spec_decoding.elements import DraftInputs


def token_table(draft: DraftModel, embed: nn.Module, limit_mb: float) -> Tensor | None:
    """``(V, D)`` the token half of the draft's input for every vocabulary entry
    (:meth:`DraftModel.input_part` of the target's embedding of every token), so that a draft step looks its
    tokens up instead of embedding, normalising and projecting them; ``None`` when the float32
    table would exceed ``limit_mb`` MiB (it is the size of the embedding matrix in float32)."""
    vocab, dim = embed.weight.shape
    if vocab * dim * 4 > limit_mb * 2**20:
        return None
    param = next(draft.parameters())
    with torch.no_grad():
        every = embed(torch.arange(vocab, device=embed.weight.device))  # the module's own scaling, if any
        return draft.input_part(every.to(param.device, param.dtype))


class Drafter:
    """A :class:`DraftModel` bound to a target's embedding and head, with a cache for one generation.

    Args:
        table: :func:`token_table`'s output, or ``None`` to embed tokens at every step.
    """

    def __init__(
        self, draft: DraftModel, embed: nn.Module, head: nn.Module, table: Tensor | None = None
    ) -> None:
        self.draft, self.embed, self.head, self.table = draft, embed, head, table
        param = next(draft.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv: KVBuffer | None = None
        self.valid = self.next_pos = self.last = None
        self.dense = True  # no padding or hole among the committed entries
        self.committed = 0  # entries before the temporary tree entries
        self.top = 0  # the largest next position of a row (next_pos's largest, kept on the host)

    def start(self, inputs: DraftInputs) -> None:
        """Run the draft over a prompt's elements (left-padded; the last one is real in every row)."""
        x = _to(inputs, self.device, self.dtype)
        hidden, keys, values = self.draft(x.inputs, x.features, x.no_feature, x.positions, x.causal_mask())
        self.kv = KVBuffer(keys, values)
        self.valid, self.committed = x.valid, x.valid.shape[1]
        self.dense = bool(x.valid.all())
        self.next_pos = x.valid.sum(1)
        self.top = int(self.next_pos.max())
        self.last = hidden[:, -1]

    def log_probs(self, hidden: Tensor) -> Tensor:
        """``(B, q, V)`` the target head's log-probabilities for draft outputs ``(B, q, D)``."""
        return self.logits(hidden).log_softmax(-1)

    def logits(self, hidden: Tensor) -> Tensor:
        """``(B, q, V)`` the target head's logits (float32) for draft outputs ``(B, q, D)``."""
        return self.head(hidden.to(self.head.weight.dtype)).float()

    def tree_step(self, tokens: Tensor, features: Tensor, level: int, visible: Tensor | None) -> Tensor:
        """Append the frontier's entries (see :data:`.tree.DraftStep`); returns their outputs.
        The tree entries are never read as committed ones: :meth:`commit` cuts them."""
        b, k = tokens.shape
        positions = (self.next_pos + (level - 1))[:, None]
        mask = None  # a chain over a cache without padding or holes sees every entry
        if k > 1 or not self.dense:
            positions = positions.expand(b, k)
            past = self.valid[:, None, :].expand(b, k, -1)  # the committed entries, then the tree's
            if visible is None:  # a chain (k = 1): every tree entry, itself included
                drafted = self.kv.length - self.committed + 1
                mask = torch.cat([past, past.new_ones(b, k, drafted)], -1)
            else:
                eye = torch.eye(k, dtype=torch.bool, device=self.device).expand(b, k, k)
                mask = torch.cat([past, visible, eye], -1)
        elements = self._elements(tokens, features)
        return self.draft.layer(elements, positions, mask, self.kv, self.top + level)[0]

    def commit(self, tokens: Tensor, features: Tensor, real: Tensor) -> None:
        """Drop the tree entries, then append committed elements (holes first in each row, so the
        last element is real in every row that committed anything).

        Args:
            tokens: ``(B, m)`` committed tokens. features: ``(B, m, D)`` the target feature of each
                one's predecessor. real: ``(B, m)`` bool, False on holes.
        """
        self.kv.length = self.committed  # drop the tree entries
        b, m = tokens.shape
        all_real = bool(real.all())
        new = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()
        if all_real:
            positions = self.next_pos[:, None] + torch.arange(m, device=self.device)
        else:
            positions = (self.next_pos[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
            new = (new & real[:, None, :]) | torch.eye(m, dtype=torch.bool, device=self.device)
        mask = torch.cat([self.valid[:, None, :].expand(b, m, -1), new.expand(b, m, m)], -1)
        hidden = self.draft.layer(
            self._elements(tokens, features.to(self.dtype)), positions, mask, self.kv, self.top + m
        )[0]
        self.valid = torch.cat([self.valid, real], 1)
        self.committed = self.valid.shape[1]
        self.dense = self.dense and all_real
        self.next_pos = self.next_pos + real.sum(1)
        self.top = int(self.next_pos.max())
        self.last = hidden[:, -1]

    def select(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` ``(b,)`` of the cache (the others finished)."""
        rows = rows.to(self.device)
        self.kv.select(rows)
        self.valid, self.next_pos, self.last = self.valid[rows], self.next_pos[rows], self.last[rows]
        self.dense = bool(self.valid.all())
        self.top = int(self.next_pos.max())

    def _elements(self, tokens: Tensor, features: Tensor) -> Tensor:
        """``(B, k, D)`` the draft's elements for tokens ``(B, k)`` after features ``(B, k, D)``."""
        if self.table is not None:
            part = self.table[tokens.to(self.table.device)]
        else:
            embedded = self.embed(tokens.to(self.embed.weight.device)).to(self.device, self.dtype)
            part = self.draft.input_part(embedded)
        return part + self.draft.feature_part(features)


def _to(inputs: DraftInputs, device: torch.device, dtype: torch.dtype) -> DraftInputs:
    return DraftInputs(
        inputs=inputs.inputs.to(device, dtype),
        features=inputs.features.to(device, dtype),
        no_feature=inputs.no_feature.to(device),
        src=inputs.src.to(device),
        valid=inputs.valid.to(device),
        positions=inputs.positions.to(device),
    )
