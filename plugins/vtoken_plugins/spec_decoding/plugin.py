"""The ``spec_decoding`` plugin: SpecVLM's lossless speculative decoding behind ``model.generate``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vtoken import Plugin, UnsupportedInputError
from vtoken.layout import VisualLayout
from vtoken_plugins.spec_decoding.compressor import BRANCHES
from vtoken_plugins.spec_decoding.config import SpecDecodingConfig
from vtoken_plugins.spec_decoding.drafting import Drafter, token_table
from vtoken_plugins.spec_decoding.loop import PREFILL_TOKENS, SpecLoop
from vtoken_plugins.spec_decoding.options import parse_generate
from vtoken_plugins.spec_decoding.weights import find_draft


class Capture:
    """Hooks on the language model that keep, while a speculative ``generate`` runs, the prompt's
    input embeddings, the target's last hidden states and the positions transformers chose."""

    def __init__(self, session) -> None:
        self.session, self.active = session, False
        self.clear()
        session.patcher.pre_hook(session.parts.language_model, self._before)
        session.patcher.post_hook(session.parts.language_model, self._after)

    def clear(self) -> None:
        self.embeds: Tensor | None = None  # (B, L, D) the prompt as the language model saw it
        self.prompt_features: Tensor | None = None  # (B, L, D) the prefill's last hidden states
        self.hidden: Tensor | None = None  # (B, q, D) of the latest forward
        self.positions: Tensor | None = None  # position ids of the latest forward, if passed
        self.past = 0

    def start(self) -> None:
        self.clear()
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.clear()

    def next_position(self) -> Tensor:
        """Position ids of the token after the latest forward's last one: ``(B,)``, or ``(A, B)``
        for multi-axis RoPE (each axis advances by one for a text token)."""
        batch = self.hidden.shape[0]
        if self.positions is None:  # the model used its cache position
            return torch.full((batch,), self.past + self.hidden.shape[1], device=self.hidden.device)
        last = self.positions[..., -1] + 1  # (1|B,) or (A, 1|B)
        return last.expand(*last.shape[:-1], batch)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active:
            return
        state = self.session.state
        self.positions, self.past = kwargs.get("position_ids"), state.past_length
        if state.phase == "prefill":
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = module.get_input_embeddings()(
                    kwargs["input_ids"] if "input_ids" in kwargs else args[0]
                )
            self.embeds = embeds.detach()

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if self.prompt_features is None:
            self.prompt_features = self.hidden


class SpecDecoding(Plugin):
    """SpecVLM (Huang et al., 2025, arXiv:2508.16201) on EAGLE-2 (Li et al., 2024, arXiv:2406.16858).

    A one-layer draft reads the target's features and a compressed view of the image
    (:mod:`.draft`, :mod:`.compressor`), drafts a tree of continuations (:mod:`.tree`) which the
    target verifies in one forward (:mod:`.verify`). Lossless: the output is the target's own greedy
    decoding whatever the draft proposes.

    Example:
        >>> vtoken.attach(model, SpecDecoding(tree="chain", depth=5))  # doctest: +SKIP
    """

    name = "spec_decoding"
    config_class = SpecDecodingConfig
    knobs = ("tree", "top_k", "depth", "total_tokens", "stop_below", "compressor")
    config: SpecDecodingConfig

    def __init__(self, config: SpecDecodingConfig | None = None, /, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.reset(None)

    def reset(self, state) -> None:
        """A new prompt: forget the last call's measurements."""
        self.rounds: list[list[int]] = []  # accepted drafts per round and unfinished row
        self.drafted: list[int] = []  # draft tokens verified per row in each round
        self.batch_rows: list[int] = []  # rows in the batch each round verified (finished rows leave)
        self.draft_s = 0.0  # wall time the draft took (prefill, trees, commits)
        self.rounds_s = 0.0  # wall time of the rounds (the draft's prompt, drafts, verifies, commits)
        self.round_tokens = 0  # tokens the rounds committed, every row
        self.branches: list[str] = []  # the compressor branch each row's image went through
        self.marks: list[tuple[int, str | None]] = []  # row 0's tokens: "draft" (accepted) or "target"
        self.row0_rounds: list[int] = []  # tokens row 0 committed in each round

    @property
    def speculative(self) -> bool:  # type: ignore[override]
        return self.config.enabled

    def report_extras(self) -> dict[str, Any]:
        """Rounds, accepted drafts and committed tokens per round (mean over rounds and unfinished
        rows: EAGLE's "accepted length" counts the bonus token too, ``tokens_per_round``), the
        draft tokens verified per round and row (``drafted_per_round``: a chain's length, below
        ``depth`` where ``stop_below`` ended it), the draft's wall time and the compressor branch per row."""
        counts = [n for round_ in self.rounds for n in round_]
        mean = sum(counts) / len(counts) if counts else 0.0
        return {
            "rounds": len(self.rounds),
            "accepted_per_round": mean,
            "tokens_per_round": mean + 1 if counts else 0.0,
            "drafted_per_round": sum(self.drafted) / len(self.drafted) if self.drafted else 0.0,
            "draft_s": self.draft_s,
            "rounds_s": self.rounds_s,
            "round_tokens": self.round_tokens,
            "tokens_per_s": self.round_tokens / self.rounds_s if self.rounds_s > 0 else 0.0,
            "branches": list(self.branches),
        }

    def token_marks(self) -> list[tuple[int, str | None]]:
        """Row 0 of the last call: each token labelled ``"draft"`` (proposed by the draft and
        accepted) or ``"target"`` (the target's own: the prefill's and each round's bonus token)."""
        return list(self.marks)

    def charts(self) -> dict[str, dict[str, float]]:
        """Tokens committed in each round (accepted drafts + the bonus token), for row 0."""
        rounds = {str(i + 1): n for i, n in enumerate(self.row0_rounds)}
        return {"tokens per round (row 0; draft + target)": rounds} if rounds else {}

    @classmethod
    def bench_settings(cls) -> dict[str, SpecDecodingConfig]:
        """A draft chain of up to 10 that stops below a mean path probability of 0.5, the fastest
        setting measured on CPU (the trained draft: on the bundled model only; a random-weight
        speed model has no draft, so speculative decoding is timed by its own benchmark,
        :mod:`.bench`)."""
        return {"spec-chain-d10-stop0.5": SpecDecodingConfig(tree="chain", depth=10, stop_below=0.5)}

    @classmethod
    def do_nothing(cls) -> SpecDecodingConfig:
        """No drafting: ``generate`` is transformers' own."""
        return SpecDecodingConfig(enabled=False)

    def check_model(self, parts) -> None:
        super().check_model(parts)
        impl = parts.language_model.config._attn_implementation  # before any plugin wraps it
        if self.config.enabled and impl not in ("sdpa", "eager"):
            raise UnsupportedInputError(
                f"spec_decoding verifies a tree through a 4-D attention mask, which the {impl!r} attention "
                "implementation cannot take; call model.set_attn_implementation('sdpa') before attaching."
            )
        self.eager = impl == "eager"  # eager adds its mask: the tree mask must be additive there

    def setup(self, session) -> None:
        if not self.config.enabled:
            return
        model = session.model
        draft, self.draft_info = find_draft(model, self.config.draft, self.config.seed)
        head = model.get_output_embeddings()
        self.draft = draft.to(head.weight.device, torch.float32)
        self.table = token_table(self.draft, model.get_input_embeddings(), self.config.table_mb)
        self.capture = Capture(session)

    def generate(self, base_generate: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.config.enabled:
            return base_generate(*args, **kwargs)
        model = self.session.model
        config, inputs = parse_generate(model, args, kwargs)
        budget = config.max_new_tokens or (config.max_length - inputs["input_ids"].shape[1])
        if budget <= PREFILL_TOKENS:  # nothing left to speculate on
            return base_generate(*args, **kwargs)
        self.drafter = Drafter(
            self.draft, model.get_input_embeddings(), model.get_output_embeddings(), self.table
        )
        with torch.no_grad():
            return SpecLoop(self, config, self.config.shape).run(base_generate, inputs)

    def compress(
        self, embeds: Tensor, real: Tensor, visual: Tensor, layout: VisualLayout | None
    ) -> list[list[Tensor]]:
        """Each row's images as draft slots: per row, a ``(M_k, D)`` tensor per image.

        Args:
            embeds: ``(B, L, D)`` the prompt as the language model saw it (visual tokens included).
            real, visual: ``(B, L)`` bool. layout: where the images are.
        """
        if layout is None:
            return [[] for _ in range(len(embeds))]
        compressor = self.draft.compressor
        embeds = embeds.to(self.draft.f_vis.device, torch.float32)
        branches = [self.config.compressor] * len(embeds)
        if self.config.compressor == "gate":
            text = (real & ~visual).to(embeds.dtype)[..., None]
            vis = visual.to(embeds.dtype)[..., None]
            question = (embeds * text).sum(1) / text.sum(1).clamp(min=1)
            seen = (embeds * vis).sum(1) / vis.sum(1).clamp(min=1)
            branches = [BRANCHES[i] for i in compressor.gate_logits(question, seen).argmax(-1).tolist()]
        self.branches = branches
        images = [(b, pos) for b in range(len(embeds)) for pos in _images(layout, b, embeds.device)]
        out: list[list[Tensor]] = [[] for _ in range(len(embeds))]
        for (b, _), slots in zip(images, _compress_grouped(compressor, embeds, images, branches)):
            out[b].append(slots)
        return out


def _images(layout: VisualLayout, row: int, device: torch.device) -> list[Tensor]:
    """The prompt positions ``(N_k,)`` of each image of ``row``, in order."""
    positions, segments = layout.positions[row], layout.segments[row]
    if not len(positions):
        return []
    images = [positions[(segments == s) & (positions >= 0)] for s in range(int(segments.max()) + 1)]
    return [pos.to(device) for pos in images if len(pos)]


def _compress_grouped(
    compressor: nn.Module, embeds: Tensor, images: list[tuple[int, Tensor]], branches: list[str]
) -> list[Tensor]:
    """Each image's ``(M, D)`` slots, one compressor call per branch and image size.

    Args:
        embeds: ``(B, L, D)``. images: (row, positions) per image. branches: each row's branch.
    """
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (b, pos) in enumerate(images):
        groups.setdefault((branches[b], len(pos)), []).append(i)
    slots: list[Tensor] = [embeds.new_empty(0)] * len(images)
    for (branch, _), members in groups.items():
        stacked = torch.stack([embeds[images[i][0], images[i][1]] for i in members])  # (n, N, D)
        for i, out in zip(members, compressor(branch, stacked)):
            slots[i] = out
    return slots
