"""The decoding loop behind ``model.generate``: draft a tree, verify it, keep the accepted path.

1. transformers' own ``generate`` runs the prefill (``max_new_tokens=1``): it encodes the images,
   computes padding-aware and M-RoPE positions and builds the cache exactly as for plain decoding;
   hooks keep the prompt's embeddings, the target's features and the prompt's positions, after
   which every text token advances each position axis by one.
2. The draft reads the prompt (images through its compressor) and the first generated token.
3. Each round drafts a tree (:mod:`.tree`), verifies it in one target forward (:mod:`.verify`:
   greedy acceptance, or rejection sampling when ``do_sample``), keeps the accepted path in the
   target's cache (:func:`vtoken.cache.keep_recent`) and commits the path and the bonus token to
   the draft.

The rounds run under ``torch.inference_mode`` (no autograd view or version tracking, which costs
a draft step of ~60 small kernels about a fifth of its time on CPU); what ``generate`` returns is
built outside it, so the outputs are ordinary tensors.

Rows of a batch keep the same number of new cache slots per round: a row that accepted fewer tokens
keeps some rejected nodes as holes, masked from then on like left padding, so every cache keeps one
logical length. Finished rows leave the batch (its caches are indexed down to the unfinished rows)
when spec_decoding is the only plugin attached; beside another plugin, which may keep per-row state,
they ride along with nothing accepted.

Output as ``generate``'s, with two documented differences at batch > 1: ``scores`` / ``logits`` of a
row that has finished are zeros (plain ``generate`` scores the padding it feeds such rows), and
``past_key_values`` is ``None`` (the cache holds holes only this loop's mask knows).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput

from vtoken import UnsupportedInputError
from vtoken.cache import keep_recent
from vtoken.masks import as_attention_mask
from vtoken.metrics import cache_bytes
from vtoken_plugins.spec_decoding.elements import draft_inputs, image_starts
from vtoken_plugins.spec_decoding.scoring import min_new_tokens, node_scores
from vtoken_plugins.spec_decoding.tree import draft_tree
from vtoken_plugins.spec_decoding.verify import (
    greedy_accept,
    keep_slots,
    sample_accept,
    tree_mask,
    tree_positions,
)

PREFILL_TOKENS = 1  # tokens transformers' generate produces before the rounds start


@dataclass
class Rows:
    """Per-row output bookkeeping.

    Attributes:
        tokens: new tokens of each row. finished: rows done (eos or budget). budget: max new tokens.
        eos: end-of-sequence ids. scores / logits: per row, the processed / raw target scores
            ``(V,)`` behind each new token (kept when asked for). rounds: accepted drafts per
            round and unfinished row.
    """

    tokens: list[list[int]]
    finished: list[bool]
    budget: int
    eos: set[int]
    scores: list[list[Tensor]] | None = None
    logits: list[list[Tensor]] | None = None
    rounds: list[list[int]] = field(default_factory=list)

    def add(
        self, row: int, new: list[int], scores: Tensor | None = None, logits: Tensor | None = None
    ) -> int:
        """Commit ``new`` (with its ``(n, V)`` scores) to ``row``, cut after the first eos and at the
        budget; returns how many tokens were taken."""
        taken = 0
        for i, token in enumerate(new):
            if self.finished[row]:
                break
            self.tokens[row].append(token)
            for store, values in ((self.scores, scores), (self.logits, logits)):
                if store is not None:
                    store[row].append(values[i])
            taken += 1
            self.finished[row] = token in self.eos or len(self.tokens[row]) >= self.budget
        return taken


@dataclass
class Live:
    """The batch the target and the draft decode: the rows still decoding where finished rows leave
    it (:meth:`SpecLoop._drop_finished`), else every row.

    Attributes:
        rows: the caller's row of each batch row. root: ``(b,)`` each row's last committed token.
        key_valid: ``(b, T)`` bool, the target's cache entries each row attends to (False on
            padding and holes). next_pos: ``(b,)`` or ``(A, b)`` the next token's position ids.
    """

    rows: list[int]
    root: Tensor
    key_valid: Tensor
    next_pos: Tensor


class SpecLoop:
    """One ``generate`` call of the ``spec_decoding`` plugin (all state lives here)."""

    def __init__(self, plugin: Any, config: GenerationConfig, shape: tuple[int, int, int]) -> None:
        self.plugin, self.session = plugin, plugin.session
        self.model, self.config = self.session.model, config
        self.top_k, self.depth, self.total = shape
        self.started = time.perf_counter()

    def run(self, base_generate: Any, inputs: dict[str, Any]) -> Any:
        """Prefill through ``base_generate``, then the rounds; returns what ``generate`` would."""
        streamer = inputs.pop("streamer", None)
        prefill = copy.deepcopy(self.config)
        prefill.max_new_tokens, prefill.max_length = PREFILL_TOKENS, None
        least = min(min_new_tokens(self.config, inputs["input_ids"].shape[1]), PREFILL_TOKENS)
        prefill.min_new_tokens, prefill.min_length = least or None, 0
        prefill.return_dict_in_generate = True
        capture = self.plugin.capture
        capture.start()
        try:
            out = base_generate(**inputs, generation_config=prefill)
            rows = self._rows(inputs["input_ids"], out)
            if streamer is not None:
                streamer.put(out.sequences.cpu())
            if not all(rows.finished):
                self._timed_rounds(inputs, out.sequences, rows, streamer)
        finally:
            capture.stop()
        if streamer is not None:
            streamer.end()
        self.plugin.rounds = rows.rounds
        return self._output(inputs["input_ids"], rows, self.session.state.cache)

    # -- setup -------------------------------------------------------------------------------------
    def _rows(self, prompt: Tensor, out: Any) -> Rows:
        eos = self.config.eos_token_id
        eos = set() if eos is None else {int(e) for e in torch.tensor(eos).flatten().tolist()}
        length = prompt.shape[1]
        budget = self.config.max_new_tokens or (self.config.max_length - length)
        batch = len(prompt)
        scores = [[] for _ in range(batch)] if self.config.output_scores else None
        logits = [[] for _ in range(batch)] if self.config.output_logits else None
        rows = Rows([[] for _ in range(batch)], [False] * batch, budget, eos, scores, logits)
        for b, new in enumerate(out.sequences[:, length:].tolist()):
            taken = rows.add(
                b, new,
                None if scores is None else [step[b] for step in out.scores],
                None if logits is None else [step[b] for step in out.logits],
            )  # fmt: skip
            if b == 0:
                self.plugin.marks += [(t, "target") for t in new[:taken]]
        return rows

    def _timed_rounds(self, inputs: dict[str, Any], sequences: Tensor, rows: Rows, streamer: Any) -> None:
        """The rounds under ``torch.inference_mode`` (see the module), with their wall time and the
        tokens they commit (every row) kept for the report."""
        before, start = sum(map(len, rows.tokens)), _clock(self.plugin.drafter.device)
        with torch.inference_mode():
            self._rounds(inputs, sequences, rows, streamer)
        self.plugin.rounds_s = _clock(self.plugin.drafter.device) - start
        self.plugin.round_tokens = sum(map(len, rows.tokens)) - before

    def _rounds(self, inputs: dict[str, Any], sequences: Tensor, rows: Rows, streamer: Any) -> None:
        capture, session = self.plugin.capture, self.session
        cache = session.state.cache
        prompt = inputs["input_ids"]
        real = inputs.get("attention_mask", torch.ones_like(prompt)).bool()
        key_valid = torch.cat(
            [real, torch.ones_like(sequences[:, prompt.shape[1] : -1], dtype=torch.bool)], 1
        )
        drafter = self.plugin.drafter
        clock = _clock(drafter.device)
        drafter.start(self._draft_prompt(prompt, real, sequences))
        live = Live(list(range(len(prompt))), sequences[:, -1], key_valid, capture.next_position())
        minimum = min_new_tokens(self.config, prompt.shape[1])
        eos, dtype = sorted(rows.eos), self.model.dtype
        while not all(rows.finished):
            depth = self._depth(len(prompt))
            done = torch.tensor([rows.finished[r] for r in live.rows])
            tree = draft_tree(
                live.root, drafter.last, drafter.tree_step, drafter.log_probs, self.top_k, depth,
                self.total, self.plugin.config.stop_below, ~done,
            )  # fmt: skip
            self.plugin.draft_s += _clock(drafter.device) - clock
            self.plugin.drafted.append(tree.size - 1)
            self.plugin.batch_rows.append(len(live.rows))
            ancestors = tree.ancestors()
            mask = as_attention_mask(tree_mask(live.key_valid, ancestors), dtype, self.plugin.eager)
            session.state.speculating = True
            try:
                logits = self.model(
                    input_ids=tree.tokens,
                    attention_mask=mask,
                    position_ids=tree_positions(live.next_pos, tree.depth),
                    use_cache=True,
                    **{session._cache_arg: cache},
                ).logits
            finally:
                session.state.speculating = False
            generated = torch.tensor([len(rows.tokens[r]) for r in live.rows])
            scores = node_scores(logits, self.config, tree.depth, generated, eos, minimum)
            if self.config.do_sample:
                accepted = sample_accept(tree, scores.softmax(-1))
            else:
                accepted = greedy_accept(tree, ancestors, scores.argmax(-1))
            width = int(accepted.count.max()) + 1
            slots, on_path = keep_slots(accepted.on_path, width)
            keep_recent(cache, slots, tree.size, prefix=tree.chain)
            for plugin in session.plugins:
                plugin.after_accept(session.state)
            done = done.to(live.key_valid.device)
            live.key_valid = torch.cat([live.key_valid, on_path.to(done.device) & ~done[:, None]], 1)
            clock = _clock(drafter.device)
            verified = (capture.hidden, scores, logits)
            self._commit(drafter, tree, accepted, verified, done, rows, live.rows, streamer)
            live.next_pos = live.next_pos + (accepted.count + 1).to(live.next_pos.device)
            live.root = accepted.bonus
            if self.config.max_time is not None and time.perf_counter() - self.started > self.config.max_time:
                rows.finished = [True] * len(rows.finished)
            if self._compacts():
                self._drop_finished(live, rows, cache, drafter)
        self.plugin.draft_s += _clock(drafter.device) - clock

    def _compacts(self) -> bool:
        """Whether finished rows may leave the batch: when no other plugin (nor the token runtime)
        keeps per-row state that a smaller batch would misalign."""
        return self.session.runtime is None and all(p is self.plugin for p in self.session.plugins)

    def _drop_finished(self, live: Live, rows: Rows, cache: Any, drafter: Any) -> None:
        """Take the rows that finished out of the batch (the target's cache, the draft's, the
        loop's), so that later rounds verify and draft the unfinished rows only (plain ``generate``
        keeps decoding padding for them)."""
        keep = [i for i, r in enumerate(live.rows) if not rows.finished[r]]
        if not keep or len(keep) == len(live.rows):
            return
        index = torch.tensor(keep)
        left = len(live.rows) - len(keep)  # every row holds as many entries: its share of the bytes
        self.session.state.released_kv_bytes += cache_bytes(cache) * left // len(live.rows)
        cache.batch_select_indices(index)
        drafter.select(index)
        live.rows = [live.rows[i] for i in keep]
        device = live.root.device
        live.root = live.root[index.to(device)]
        live.key_valid = live.key_valid[index.to(live.key_valid.device)]
        live.next_pos = live.next_pos[..., index.to(live.next_pos.device)]

    def _depth(self, batch: int) -> int:
        """This round's tree depth: the configured one, or less where another plugin must act on
        the cache after a few more entries (its :meth:`~vtoken.Plugin.speculation_budget`); the root
        and the accepted drafts are the round's new entries."""
        state = self.session.state
        budgets = {p.name: b for p in self.session.plugins if (b := p.speculation_budget(state)) is not None}
        if not budgets:
            return self.depth
        if batch > 1:
            names = ", ".join(budgets)
            raise UnsupportedInputError(
                f"spec_decoding beside {names} runs at batch size 1: rows commit different numbers of "
                f"tokens per round, while {names} acts on the whole batch's cache on a token schedule. "
                "Generate one prompt at a time, or detach one of them."
            )
        return max(0, min(self.depth, min(budgets.values()) - 1))

    def _commit(
        self, drafter, tree, accepted, verified: tuple[Tensor, Tensor, Tensor], done, rows, order, streamer
    ) -> None:
        """Give the draft the accepted path and bonus (with the target's features) and the rows
        their new tokens (with the scores behind them); ``order``: the caller's row of each batch row."""
        hidden, scores, logits = verified
        index, real = accepted.commit_order()  # (B, m): root, accepted nodes; left-padded
        tokens = torch.cat([tree.tokens.gather(1, index)[:, 1:], accepted.bonus[:, None]], 1)
        features = hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))
        real = real & ~done.to(real.device)[:, None]
        drafter.commit(tokens, features.float(), real.to(drafter.device))
        counts = accepted.count.tolist()
        rows.rounds.append([c for c, f in zip(counts, done.tolist()) if not f])
        for b, (row, n) in enumerate(zip(tokens.tolist(), counts)):
            nodes = index[b, len(row) - n - 1 :]  # the node predicting each new token
            taken = rows.add(
                order[b], row[len(row) - n - 1 :],
                scores[b, nodes] if rows.scores is not None else None,
                logits[b, nodes].float() if rows.logits is not None else None,
            )  # fmt: skip
            new = row[len(row) - n - 1 :][:taken]
            if order[b] == 0 and taken:
                self.plugin.marks += list(zip(new, ["draft"] * n + ["target"]))
                self.plugin.row0_rounds.append(taken)
            if streamer is not None and taken:
                streamer.put(torch.tensor(new))

    def _draft_prompt(self, prompt: Tensor, real: Tensor, sequences: Tensor):
        """The draft's elements for the prompt and the tokens generated so far."""
        capture, layout = self.plugin.capture, self.session.state.layout
        length = prompt.shape[1]
        generated = self.model.get_input_embeddings()(sequences[:, length:])
        embeds = torch.cat([capture.embeds.to(generated.dtype), generated], 1).float()  # (B, T, D)
        features = capture.prompt_features.float()  # (B, L, D)
        features = torch.cat([features, features[:, -1:]], 1)  # the newest token's is never read
        real = torch.cat([real, torch.ones_like(sequences[:, length:], dtype=torch.bool)], 1)
        visual = torch.zeros_like(real)
        starts: list[list[int]] = [[] for _ in range(len(prompt))]
        if layout is not None:
            visual[:, :length] = layout.is_visual(length).to(visual.device)
            starts = image_starts(layout)
        slots = self.plugin.compress(embeds[:, :length], real[:, :length], visual[:, :length], layout)
        return draft_inputs(embeds, features, real, visual, starts, slots)

    # -- output ----------------------------------------------------------------------------------
    def _output(self, prompt: Tensor, rows: Rows, cache: Any) -> Any:
        pad = self.config.pad_token_id
        if pad is None:
            pad = next(iter(sorted(rows.eos)), 0)
        width = max(len(t) for t in rows.tokens)
        new = torch.full((len(rows.tokens), width), int(pad), dtype=prompt.dtype, device=prompt.device)
        for b, tokens in enumerate(rows.tokens):
            new[b, : len(tokens)] = torch.tensor(tokens, dtype=prompt.dtype)
        sequences = torch.cat([prompt, new], 1)
        if not self.config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=_steps(rows.scores, width),
            logits=_steps(rows.logits, width),
            past_key_values=cache if len(rows.tokens) == 1 else None,
        )


def _clock(device: torch.device) -> float:
    """The time once ``device`` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _steps(per_row: list[list[Tensor]] | None, width: int) -> tuple[Tensor, ...] | None:
    """Per-row score lists as ``generate``'s tuple of ``(B, V)`` steps (zeros after a row ended)."""
    if per_row is None:
        return None
    like = next(t for row in per_row for t in row)
    return tuple(
        torch.stack([row[t] if t < len(row) else torch.zeros_like(like) for row in per_row])
        for t in range(width)
    )
