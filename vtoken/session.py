"""Attach plugins to an unmodified transformers VLM, and detach them bit for bit.

Example:
    >>> import vtoken
    >>> with vtoken.attach(model, "token_pruning") as session:   # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=32)   # the user's own call, unchanged
    ...     print(session.report())
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from vtoken.cache import VTokenCache
from vtoken.checks import check_continuation, check_labels, expansion_factor
from vtoken.compat import cache_argument, find_cache, pop_cache
from vtoken.config import PluginConfig
from vtoken.errors import AlreadyAttachedError, UnsupportedInputError, UnsupportedModelError
from vtoken.families import ModelParts, locate_parts
from vtoken.layout import VisualLayout
from vtoken.metrics import Recorder, Report
from vtoken.patch import Patcher
from vtoken.plugin import Plugin
from vtoken.probe import LanguageAttention
from vtoken.registry import create_plugins
from vtoken.runtime import TokenRuntime
from vtoken.state import RunState
from vtoken.vision_probe import VisionProbe

PluginLike = str | Path | Plugin | PluginConfig

IMAGE_INPUTS = ("image_sizes", "image_grid_thw", "pixel_attention_mask")

_SESSIONS: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()


def attach(
    model: nn.Module, plugins: PluginLike | Sequence[PluginLike] = (), processor: Any = None
) -> Session:
    """Attach ``plugins`` to ``model`` and return the :class:`Session` that owns them.

    Args:
        model: a supported ``*ForConditionalGeneration`` model (see ``vtoken info``).
        plugins: plugin names (``"token_pruning"``), plugin or config objects, YAML config file
            paths, or a list of these; they hook in the given order.
        processor: the model's processor, for plugins that need more than ``generate``'s inputs
            (``region_proposal`` crops the original images the processor was given).

    Raises:
        UnsupportedModelError: the model's family is unsupported, or it was ``torch.compile``d.
        AlreadyAttachedError: another session is attached to this model.
    """
    return Session(model, plugins, processor)


def active_session(model: nn.Module) -> Session | None:
    """The session attached to ``model``, if any."""
    return _SESSIONS.get(model)


class Session:
    """Plugins attached to one model. Use as a context manager or call :meth:`detach`."""

    def __init__(
        self, model: nn.Module, plugins: PluginLike | Sequence[PluginLike] = (), processor: Any = None
    ) -> None:
        _check_attachable(model)
        self.model = model
        self.processor = processor
        self.parts: ModelParts = locate_parts(model)
        self.plugins: list[Plugin] = create_plugins(plugins)
        self.state = RunState()
        self.patcher = Patcher()
        self.recorder = Recorder(model, self.parts, self.state)
        self.runtime: TokenRuntime | None = None
        self._prompt_started = False
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._cache_arg = cache_argument(model.forward)
        for plugin in self.plugins:
            plugin.check_model(self.parts)
        self._check_static_default()
        try:
            self._wire()
        except BaseException:
            self.patcher.undo_all()
            raise
        _SESSIONS[model] = self

    # -- public API ------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return _SESSIONS.get(self.model) is self

    def detach(self) -> None:
        """Remove every hook and restore every attribute and attention implementation."""
        if not self.attached:
            return
        try:
            for plugin in reversed(self.plugins):
                plugin.teardown()
                plugin.session = None
        finally:
            self.patcher.undo_all()
            del _SESSIONS[self.model]
            self.state = RunState()

    def start_episode(self) -> None:
        """A new stream of frames begins (a robot episode): every plugin drops the state it keeps
        across ``generate`` calls (:meth:`Plugin.start_episode`). ``VLAPolicy.reset()`` calls it;
        call it yourself between the streams of your own loop."""
        for plugin in self.plugins:
            plugin.start_episode()

    def report(self) -> Report:
        """Efficiency report of the last generation (or forward) run while attached."""
        return self.recorder.report()

    def kept_visual(self, row: int = 0) -> torch.Tensor:
        """Which visual tokens of ``row`` each decoder layer processed in the last prefill.

        Returns:
            ``(num_layers, N_row)`` bool, visual tokens in prompt order (for LLaVA-style models,
            image after image, each in row-major patch order); all True without token dropping.
        """
        layout = self.state.layout
        if layout is None:
            raise UnsupportedInputError("kept_visual() needs a prefill with images first: run the model.")
        visual = layout.positions[row][layout.mask[row]]  # (N_row,) prompt positions
        kept = torch.ones(self.parts.num_layers, len(visual), dtype=torch.bool)
        for layer, positions in self.state.layer_positions.items():
            if positions is not None:
                kept[layer] = torch.isin(visual, positions[row].to(visual.device)).cpu()
        return kept

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        names = ", ".join(p.name or type(p).__name__ for p in self.plugins)
        return f"Session({self.parts.spec.name}, plugins=[{names}], attached={self.attached})"

    # -- wiring ----------------------------------------------------------------------------------
    def _wire(self) -> None:
        _check_speculation(self.plugins)
        self.patcher.pre_hook(self.model, self._on_forward_start)
        self.patcher.post_hook(self.model, self._on_forward_end, always=True)
        self.recorder.attach(self.patcher)
        pruners = [p for p in self.plugins if p.prunes]
        self.runtime = TokenRuntime(self, pruners) if pruners else None
        specs = {request: None for p in self.plugins for request in p.probes()}  # ordered, distinct
        attenders = [p for p in self.plugins if p.overrides("attention")]
        if specs or attenders:
            LanguageAttention(self, list(specs), attenders)
        if any(p.wants_vision_scores() for p in self.plugins):
            self.state.vision_probe = VisionProbe(self)
        transforms = [p for p in self.plugins if p.overrides("transform_visual")]
        if transforms:
            self.patcher.post_hook(self.parts.projector, self._transform_visual)
        decoders = [p for p in self.plugins if p.overrides("generate")]
        self.patcher.set_attr(self.model, "generate", self._chain_generate(decoders))
        for plugin in self.plugins:
            plugin.session = self
            plugin.setup(self)

    def _chain_generate(self, decoders: list[Plugin]) -> Callable[..., Any]:
        """``model.generate`` while attached: starts the prompt, then the plugins' loops."""
        base = self.model.generate
        for plugin in decoders:
            base = functools.partial(plugin.generate, base)

        @functools.wraps(base)
        def generate(*args: Any, **kwargs: Any) -> Any:
            # transformers encodes images before the prefill forward: the prompt must be known first
            ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
            cache = find_cache(kwargs)
            if cache is None or cache.get_seq_length() == 0:  # else: continuing (assistant drafts)
                self._start_prompt(ids, kwargs)
            try:
                output = base(*args, **kwargs)
                extras = {p.name: p.report_extras() for p in self.plugins if p.overrides("report_extras")}
                self.recorder.on_generate_end(output, extras)
                return output
            finally:
                self.state.phase = "idle"
                self._prompt_started = False

        return generate

    def _check_static_default(self) -> None:
        if getattr(self.model.generation_config, "cache_implementation", None) == "static":
            self._refuse_static("the model's generation_config.cache_implementation is 'static'")

    def _refuse_static(self, where: str) -> None:
        blocking = [p.name for p in self.plugins if not p.supports_static_cache]
        if blocking:
            raise UnsupportedInputError(
                f"{where}, but plugin(s) {', '.join(blocking)} change per-layer cache lengths and "
                "need a dynamic cache. Use generate(..., cache_implementation='dynamic') or set "
                "model.generation_config.cache_implementation = None."
            )

    # -- hooks -----------------------------------------------------------------------------------
    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:  # bind positional arguments so every hook sees them by name
            kwargs = {**dict(zip(self._forward_params, args)), **kwargs}
        cache = pop_cache(kwargs)
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if cache is not None and getattr(cache, "is_compileable", False):
            self._refuse_static(f"a {type(cache).__name__} was passed")
        past = cache.get_seq_length() if cache is not None else 0
        ids = kwargs.get("input_ids")
        self.state.query_length = _query_length(kwargs)
        self.state.past_length = past
        if past == 0:
            if not self._prompt_started:
                self._start_prompt(ids, kwargs)
            elif _repeated_rows(ids, self.state.prompt_ids):
                self._expand_prompt(ids)
            self._prompt_started = False
            self.state.phase = "prefill"
            self.state.prompt_mask = kwargs.get("attention_mask")
            if self.runtime is not None:
                check_labels(kwargs.get("labels"), self.state.layout)
            self._swap_cache(kwargs)
        else:
            if self.runtime is not None:
                check_continuation(kwargs, self.parts.image_token_ids)
            self.state.phase = "decode"
        self.state.cache = kwargs.get(self._cache_arg)
        self.recorder.on_forward_start()
        return (), kwargs

    def _start_prompt(self, ids: torch.Tensor | None, inputs: dict[str, Any]) -> None:
        """A new prompt: find its visual tokens and let plugins drop per-prompt state."""
        layout = None
        if ids is None and self.runtime is not None:
            raise UnsupportedInputError(
                "Token dropping locates visual tokens by their placeholder ids: pass input_ids "
                "(with pixel_values), not inputs_embeds."
            )
        if ids is not None:
            layout = self._layout(ids)
        self.state.start_prompt(ids, layout)
        self.state.image_inputs = {k: inputs[k] for k in IMAGE_INPUTS if inputs.get(k) is not None}
        self._prompt_started = True
        self.recorder.on_prompt_start(inputs)
        for plugin in self.plugins:
            plugin.reset(self.state)

    def restart_prompt(self, inputs: dict[str, Any], frozen: torch.Tensor | None = None) -> None:
        """A plugin's ``generate`` rewrote the prompt (``region_proposal`` adds crops as images):
        find the new prompt's visual tokens and reset the plugins' per-prompt state again, before
        the rewritten inputs' prefill.

        Args:
            frozen: ``(B, L)`` bool over the new prompt, True where visual tokens may not be dropped.
        """
        self._start_prompt(inputs.get("input_ids"), inputs)
        layout = self.state.layout
        if frozen is not None and layout is not None:
            at = frozen.to(layout.positions.device).gather(1, layout.positions.clamp(min=0))
            self.state.layout = dataclasses.replace(layout, frozen=at & layout.mask)

    def _expand_prompt(self, ids: torch.Tensor) -> None:
        """generate() repeated each prompt row (beam search, ``num_return_sequences``) after the
        prompt started: the prefill's rows are the truth from here on."""
        factor = expansion_factor(ids, self.state.prompt_ids)
        self.state.prompt_ids, self.state.expansion = ids, factor
        frozen = self.state.layout.frozen if self.state.layout is not None else None
        self.state.layout = self._layout(ids)
        if frozen is not None:  # the rows repeat, so do their frozen images
            self.state.layout = dataclasses.replace(
                self.state.layout, frozen=frozen.repeat_interleave(factor, 0)
            )
        self.recorder.on_expand(factor)

    def _layout(self, ids: torch.Tensor) -> VisualLayout:
        return VisualLayout.from_input_ids(ids, self.parts.image_token_ids, self.parts.tokens_per_image)

    def _swap_cache(self, kwargs: dict) -> None:
        if kwargs.get("use_cache", True) is False:
            return
        cache = kwargs.get(self._cache_arg)
        if cache is None or type(cache) is DynamicCache:  # transformers' default: ours may replace it
            if self.runtime is not None:
                kwargs[self._cache_arg] = VTokenCache(self.model.config)
            for plugin in self.plugins:
                made = plugin.make_cache(self.state)
                if made is not None:
                    kwargs[self._cache_arg] = made

    def _on_forward_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            if output is not None and self.state.phase != "idle":  # None: the forward raised
                for plugin in self.plugins:
                    plugin.after_forward(self.state)
            self.recorder.on_forward_end(output)
        finally:
            if self.state.phase == "decode":
                self.state.decode_steps += 1
            self.state.phase = "idle"

    def _transform_visual(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        features = output
        for plugin in self.plugins:
            if plugin.overrides("transform_visual"):
                new = plugin.transform_visual(features, self.state)
                if new.shape != features.shape:
                    raise UnsupportedInputError(
                        f"{plugin.name}.transform_visual changed the visual tokens' shape from "
                        f"{tuple(features.shape)} to {tuple(new.shape)}; it must keep it."
                    )
                features = new
        return features


def _check_speculation(plugins: list[Plugin]) -> None:
    """Refuse a speculative plugin beside one that is only exact one decoded token at a time."""
    drafters = [p.name for p in plugins if p.speculative]
    single = [p.name for p in plugins if not p.multi_token_decode]
    if drafters and single:
        raise UnsupportedInputError(
            f"{', '.join(drafters)} verifies several tokens per decode forward, but {', '.join(single)} acts "
            "on one decoded token per forward with its current settings (decode-time eviction or cache "
            "compression). Use them separately, or turn that part off (token_pruning: decode_keep_ratio=1 "
            "and decode_visual_ratio=1; zipvl: cache='full')."
        )


def _repeated_rows(ids: torch.Tensor | None, prompt_ids: torch.Tensor | None) -> bool:
    """Whether the prefill's ``ids`` have other rows than the prompt (generate repeated them)."""
    return ids is not None and prompt_ids is not None and ids.shape[0] != prompt_ids.shape[0]


def _query_length(kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    if ids is not None:
        return ids.shape[-1]
    embeds = kwargs.get("inputs_embeds")
    return embeds.shape[1] if embeds is not None else 0


def _check_attachable(model: nn.Module) -> None:
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(
        model, "_compiled_call_impl", None
    ):
        raise UnsupportedModelError(
            "vtoken cannot attach to a torch.compile'd model: compiled graphs skip or freeze the "
            "hooks plugins rely on. Attach to the original model (compiled.`_orig_mod`) instead."
        )
    if model in _SESSIONS:
        raise AlreadyAttachedError(
            f"Plugins are already attached to this model ({_SESSIONS[model]!r}). Detach that "
            "session first (session.detach()), or pass all plugins to one attach() call."
        )
