"""One step of SpecVLM's online distillation: read the frozen target, run the draft, the losses.

See :mod:`.train` for the objective; this module holds the forward of one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtoken import locate_parts
from vtoken.layout import VisualLayout
from vtoken.patch import Patcher
from vtoken_plugins.spec_decoding.compressor import BRANCHES
from vtoken_plugins.spec_decoding.draft import DraftModel
from vtoken_plugins.spec_decoding.elements import DraftInputs, draft_inputs, image_starts

if TYPE_CHECKING:
    from vtoken_plugins.spec_decoding.train import TrainConfig


class TargetReader:
    """Hooks that keep the target's last hidden states and projector output of each forward."""

    def __init__(self, model: nn.Module) -> None:
        self.parts = locate_parts(model)
        self.hidden: Tensor | None = None  # (B, L, D)
        self.visual: Tensor | None = None  # projector output, family layout
        self.patcher = Patcher()
        self.patcher.post_hook(self.parts.language_model, self._hidden)
        self.patcher.post_hook(self.parts.projector, self._visual)

    def _hidden(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _visual(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        self.visual = output

    def close(self) -> None:
        self.patcher.undo_all()


class Distiller:
    """One distillation step's forward (see the module) for a frozen target."""

    def __init__(self, model: nn.Module, draft: DraftModel, cfg: TrainConfig) -> None:
        self.model, self.draft, self.cfg = model, draft, cfg
        self.reader = TargetReader(model)
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.tau = cfg.tau_start

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and metrics for an encoded batch with ``labels`` (right-padded)."""
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        with torch.no_grad():
            logits = self.model(
                input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
            ).logits
            feats, visual = self.reader.hidden.float(), self.reader.visual.float()  # (B, L, D), (n, N, D)
            embeds = self.embed(ids).float()
        parts = self.reader.parts
        layout = VisualLayout.from_input_ids(ids, parts.image_token_ids, parts.tokens_per_image)
        is_visual = layout.is_visual(ids.shape[1])
        starts = image_starts(layout)
        per_row = [len(s) for s in starts]
        question = _mean(embeds, real & ~is_visual & (batch["labels"] == -100))
        vis_mean = torch.stack([v.mean((0, 1)) for v in visual.split(per_row)])
        gate = self.draft.compressor.gate_logits(question, vis_mean)  # (B, K)
        choice = F.gumbel_softmax(gate, tau=self.tau, hard=True)  # (B, K), one-hot forward
        targets = _loss_positions(ids, real, is_visual)  # (B, L)
        rows, shares = [], []
        for branch in BRANCHES:
            slots = self.draft.compressor(branch, visual)  # (n, M, D)
            shares.append(slots.shape[1] / visual.shape[1])
            rows += [list(s) for s in slots.split(per_row)]
        k = len(BRANCHES)
        inputs = draft_inputs(
            embeds.repeat(k, 1, 1),
            feats.repeat(k, 1, 1),
            real.repeat(k, 1),
            is_visual.repeat(k, 1),
            starts * k,
            rows,
        )
        per_elem, metrics = self._passes(
            inputs, feats.repeat(k, 1, 1), logits.float().repeat(k, 1, 1), targets.repeat(k, 1)
        )
        branch_loss = per_elem.view(k, -1)  # (K, B)
        cost = torch.tensor(shares)[None] * self.cfg.cost_weight  # (1, K)
        gate_loss = (choice * (branch_loss.T.detach() + cost)).sum(-1).mean()
        metrics.update({f"pick_{b}": v for b, v in zip(BRANCHES, choice.detach().mean(0).tolist())})
        metrics.update({f"loss_{b}": v for b, v in zip(BRANCHES, branch_loss.detach().mean(1).tolist())})
        return branch_loss.mean() + gate_loss, metrics

    def _passes(
        self, inputs: DraftInputs, feats: Tensor, logits: Tensor, targets: Tensor
    ) -> tuple[Tensor, dict]:
        """Per-row mean loss ``(R,)`` over ``unroll`` passes, and metrics (top-1 agreement per pass)."""
        src = inputs.src.clamp(min=0)
        where = targets.gather(1, src) & (inputs.src >= 0)  # (R, S)
        f_t = feats.gather(1, src[..., None].expand(-1, -1, feats.shape[-1]))  # (R, S, D)
        z_t = logits.gather(1, src[..., None].expand(-1, -1, logits.shape[-1]))  # (R, S, V)
        mask = inputs.causal_mask()
        h, key, value = self.draft(inputs.inputs, inputs.features, inputs.no_feature, inputs.positions, mask)
        keys, values = [key], [value]
        size = mask.shape[1]
        index = torch.arange(size, device=mask.device)
        total, metrics = 0.0, {}
        for n in range(self.cfg.unroll):
            if n:  # depth n: fed the previous pass's predictions, seeing what a tree node sees
                prev = torch.cat([h[:, :1].detach() * 0, h[:, :-1].detach()], 1)
                h, key, value = self.draft(
                    inputs.inputs, prev, inputs.no_feature, inputs.positions, _unrolled_mask(mask, n),
                    (torch.cat(keys, 2), torch.cat(values, 2)),
                )  # fmt: skip
                keys.append(key[:, :, -size:])
                values.append(value[:, :, -size:])
                back = inputs.src.gather(1, (index - n).clamp(min=0).expand_as(inputs.src))
                where = where & (index >= n) & (back == inputs.src - n)  # a chain of n text tokens back
            draft_logits = F.linear(
                h, self.head.weight.float(), None if self.head.bias is None else self.head.bias.float()
            )
            ce = -(z_t.softmax(-1) * draft_logits.log_softmax(-1)).sum(-1)  # (R, S)
            l1 = F.smooth_l1_loss(h, f_t, reduction="none").mean(-1)
            elem = self.cfg.ce_weight * ce + self.cfg.feature_weight * l1
            total = total + (elem * where).sum(1) / where.sum(1).clamp(min=1)
            agree = (draft_logits.argmax(-1) == z_t.argmax(-1)) & where
            metrics[f"agree{n + 1}"] = (agree.sum() / where.sum().clamp(min=1)).item()
            metrics[f"l1_{n + 1}"] = ((l1 * where).sum() / where.sum().clamp(min=1)).item()
        return total / self.cfg.unroll, metrics


def _unrolled_mask(causal: Tensor, depth: int) -> Tensor:
    """``(R, S, (depth + 1) S)`` what the element at ``p`` of pass ``depth + 1`` sees, as a node at
    that depth of a draft tree whose root is ``r = p - depth``: pass 1's keys up to ``r`` (committed
    tokens, true features), then pass ``m + 1``'s key at ``r + m`` for ``m = 1 .. depth`` (its
    ancestors and itself; EAGLE-3's training-time test)."""
    size = causal.shape[1]
    index = torch.arange(size, device=causal.device)
    offset = index[:, None] - index[None, :]  # p - j
    blocks = [causal & (offset >= depth)]
    blocks += [(offset == depth - m).expand_as(causal) for m in range(1, depth + 1)]
    return torch.cat(blocks, -1)


def _mean(x: Tensor, where: Tensor) -> Tensor:
    """``(B, D)`` mean of ``x`` ``(B, L, D)`` over ``where`` ``(B, L)``."""
    w = where.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def _loss_positions(ids: Tensor, real: Tensor, is_visual: Tensor) -> Tensor:
    """``(B, L)`` bool: real text positions after a row's last visual token whose next token is real."""
    index = torch.arange(ids.shape[1], device=ids.device)
    last_visual = torch.where(is_visual, index, -1).max(1, keepdim=True).values  # (B, 1)
    next_real = torch.zeros_like(real)
    next_real[:, :-1] = real[:, 1:]
    return real & next_real & (index > last_visual)
