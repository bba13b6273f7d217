"""Per-call state that the session keeps for its plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from vtoken.layout import VisualLayout

Phase = Literal["idle", "prefill", "decode"]


@dataclass
class RunState:
    """What the session knows about the forward call in flight and the generation it belongs to.

    A prefill (a forward whose cache is empty) starts a new generation: the prompt's layout is
    computed there and kept for the decode steps that follow.

    Attributes:
        phase: ``"prefill"`` or ``"decode"`` inside a forward call, ``"idle"`` between calls.
        prompt_ids: ``(B, L)`` input ids of the last prefill.
        layout: where the prompt's visual tokens sit (``None`` before the first prefill).
        query_length: tokens fed to the model in the call in flight.
        past_length: tokens already in the cache when the call started (logical count).
        decode_steps: decode forwards since the last prefill.
        expansion: how many rows of the prefill repeat each prompt row (``generate`` repeats them
            for beam search and ``num_return_sequences``; images are encoded before, once per row).
        cache: the cache of the call in flight (``None`` without one).
        prompt_mask: ``(B, L)`` 2-D attention mask of the last prefill (1 = real token).
        image_inputs: the prompt's image-shape inputs (``image_sizes``, ``image_grid_thw``, ...).
        vision_probe: the session's :class:`~vtoken.vision_probe.VisionProbe`, if a plugin wants one.
        seq_positions: ``(B, T)`` original positions of the prefill sequence after the latest
            token drop (``PAD`` on padding slots); ``None`` while nothing was dropped.
        layer_tokens: tokens each decoder layer processed in the last prefill (longest row).
        layer_visual: visual tokens present at each decoder layer in the last prefill (all rows).
        layer_positions: ``(B, T)`` original prompt positions each decoder layer processed in the
            last prefill (``PAD`` on padding slots), ``None`` for a layer that saw the whole prompt.
        probes: attention rows captured in the last forward, by ``(layer, spec)`` (see ``vtoken.probe``).
        attention_pairs: query-key products per head and row that a plugin's attention computed at a
            layer in the last prefill, where fewer than the full rectangle (see
            :func:`vtoken.flops.decoder_layer_flops`); the FLOPs count reads them.
        speculating: True while a decode forward verifies drafted tokens (several new tokens, some
            of which will be rolled back); plugins defer per-token work to
            :meth:`~vtoken.Plugin.after_accept`.
        released_kv_bytes: bytes of cache rows that left the batch before the end (a speculative
            loop takes finished rows out); the report counts them in the cache at the end.
        extras: scratch space for plugins, cleared at every prefill.
    """

    phase: Phase = "idle"
    prompt_ids: Tensor | None = None
    layout: VisualLayout | None = None
    query_length: int = 0
    past_length: int = 0
    decode_steps: int = 0
    expansion: int = 1
    cache: Any = None
    prompt_mask: Tensor | None = None
    image_inputs: dict[str, Any] = field(default_factory=dict)
    vision_probe: Any = None
    seq_positions: Tensor | None = None
    layer_tokens: dict[int, int] = field(default_factory=dict)
    layer_visual: dict[int, int] = field(default_factory=dict)
    layer_positions: dict[int, Tensor | None] = field(default_factory=dict)
    probes: dict[tuple[int, Any], Any] = field(default_factory=dict)
    attention_pairs: dict[int, float] = field(default_factory=dict)
    speculating: bool = False
    released_kv_bytes: int = 0
    extras: dict[str, object] = field(default_factory=dict)

    def start_prompt(self, prompt_ids: Tensor | None, layout: VisualLayout | None) -> None:
        """A new prompt begins (before its images are encoded and its prefill runs)."""
        self.prompt_ids, self.layout = prompt_ids, layout
        self.decode_steps, self.expansion, self.released_kv_bytes = 0, 1, 0
        self.seq_positions = None
        for table in (
            self.layer_tokens,
            self.layer_visual,
            self.layer_positions,
            self.probes,
            self.extras,
            self.attention_pairs,
        ):
            table.clear()
