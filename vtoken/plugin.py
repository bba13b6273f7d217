"""The plugin base class: small override points on top of hook plumbing owned by the session.

A plugin is a config dataclass plus a class that overrides one or two of the methods below; the
session wires each overridden method to the right transformers extension point when attached and
removes it on detach. Every override point has a do-nothing default.

Override points:
    - :meth:`Plugin.prune_layers` + :meth:`Plugin.select` - which visual tokens to keep at a layer,
      and :meth:`Plugin.merge` - what the kept ones carry (e.g. the average of merged neighbours);
    - :meth:`Plugin.probes` - attention rows to capture for scoring (see :mod:`vtoken.probe`);
    - :meth:`Plugin.attention` - the language model's attention call itself (e.g. sparse attention);
    - :meth:`Plugin.transform_visual` - the visual tokens as they leave the projector;
    - :meth:`Plugin.after_forward` - after every prefill / decode forward (e.g. cache eviction);
    - :meth:`Plugin.make_cache` - the KV cache a prefill starts with;
    - :meth:`Plugin.generate` - the decoding loop behind ``model.generate``;
    - :meth:`Plugin.report_extras` - the plugin's own measurements in the session's report;
    - :meth:`Plugin.charts` - figures about the last generation for user interfaces;
    - :meth:`Plugin.token_marks` - labels on the generated tokens for user interfaces;
    - :meth:`Plugin.overlay` - what the plugin found, drawn on the input image, for user interfaces;
    - :meth:`Plugin.start_episode` - a new stream of frames (a robot episode) begins;
    - :meth:`Plugin.setup` - anything else, through the session's :class:`~vtoken.patch.Patcher`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn
from transformers import Cache

from vtoken.config import PluginConfig
from vtoken.errors import ConfigError, UnsupportedModelError
from vtoken.families import ModelParts
from vtoken.probe import ProbeSpec
from vtoken.state import RunState

AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]

if TYPE_CHECKING:
    from PIL import Image

    from vtoken.runtime import PruneView
    from vtoken.session import Session


class Plugin:
    """Base class of all vtoken plugins.

    Class attributes:
        name: registry name (``"token_pruning"``).
        config_class: the plugin's :class:`PluginConfig` dataclass.
        families: family names the plugin supports; ``None`` means all of vtoken's families.
        supports_static_cache: whether the plugin is exact with a pre-allocated ``StaticCache``.
        evicts_cache: set when the plugin removes cache entries itself (decode-time eviction through
            :meth:`vtoken.VTokenCache.evict`), so the session installs the token runtime.
        knobs: the config fields a user interface offers as the plugin's main options (the demo
            app builds its widgets from them, see :mod:`vtoken.knobs`).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PluginConfig]] = PluginConfig
    families: ClassVar[tuple[str, ...] | None] = None
    supports_static_cache: ClassVar[bool] = False
    evicts_cache: ClassVar[bool] = False
    knobs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PluginConfig | None = None, /, **overrides: Any) -> None:
        if config is None:
            config = self.config_class.from_dict(overrides)
        elif not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}."
            )
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        self.session: Session | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- lifecycle -------------------------------------------------------------------------------
    def check_model(self, parts: ModelParts) -> None:
        """Raise :class:`UnsupportedModelError` if this plugin cannot run on the model."""
        if self.families is not None and parts.spec.name not in self.families:
            raise UnsupportedModelError(
                f"Plugin {self.name!r} does not support the {parts.spec.name} family; "
                f"it supports: {', '.join(self.families)}."
            )

    def setup(self, session: Session) -> None:
        """Called once when attached, after the override points are wired."""

    def teardown(self) -> None:
        """Called once when detached, before the session undoes its changes."""

    def reset(self, state: RunState) -> None:
        """Called at every prefill, before any hook of that forward: drop per-prompt state."""

    def start_episode(self) -> None:
        """Called by :meth:`Session.start_episode` (a policy's ``reset()``): the prompts that follow
        are the frames of a new stream, unrelated to the previous ones; drop state kept across
        ``generate`` calls (e.g. ``temporal_smoother``'s history)."""

    # -- override points -------------------------------------------------------------------------
    def prune_layers(self) -> tuple[int, ...]:
        """Decoder layers at whose input this plugin chooses visual tokens (0 = before layer 0)."""
        return ()

    def select(self, layer_idx: int, view: PruneView) -> Tensor | None:
        """Choose the visual tokens to keep at ``layer_idx`` (prefill).

        Args:
            layer_idx: one of :meth:`prune_layers`.
            view: hidden states, positions and the visual tokens still present.

        Returns:
            ``(B, N)`` bool over ``view.visual`` (True = keep), or ``None`` to keep all.
        """
        return None

    def merge(self, layer_idx: int, view: PruneView, keep: Tensor) -> Tensor | None:
        """Optionally rewrite the kept visual tokens, e.g. to fold dropped tokens into them.

        Args:
            layer_idx: the decision layer.
            view: as in :meth:`select`.
            keep: ``(B, N)`` the final keep mask over ``view.visual``.

        Returns:
            ``(B, N, D)`` new hidden states for ``view.visual`` (only kept entries matter), or
            ``None`` to leave them as they are.
        """
        return None

    def wants_vision_scores(self) -> bool:
        """Whether :meth:`select` reads ``view.vision_scores()`` (the vision encoder's own
        [CLS] / global attention per visual token, see :mod:`vtoken.vision_probe`)."""
        return False

    def probes(self) -> tuple[tuple[int, ProbeSpec], ...]:
        """Attention rows to capture in prefill, as ``(layer, spec)`` requests; read them in
        :meth:`select` from ``view.state.probes[(layer, spec)]`` (a :class:`~vtoken.probe.Probe`).
        Several specs may share a layer (and several plugins a request: it is captured once)."""
        return ()

    def attention(
        self,
        base: AttentionFunction,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Compute one decoder layer's attention (prefill and decode), in transformers' attention
        interface; delegate to ``base`` (the next plugin's override, else the model's own sdpa or
        eager function) for anything not changed. Probes are captured before any override runs.

        Args:
            base: ``base(module, query, key, value, attention_mask, **kwargs)``.
            module: the attention module (``module.layer_idx`` is the layer).
            query: ``(B, H, q, d)`` rotated queries.
            key, value: ``(B, H_kv, T, d)`` everything the layer attends to (cache included).
            attention_mask: ``(B, 1, q, T)`` bool or additive mask, or ``None`` (causal).
            kwargs: ``scaling``, ``dropout``, ``softcap``, ... as transformers passes them.

        Returns:
            ``(B, q, H, d)`` attention output and the weights (or ``None``), as ``base`` returns.
        """
        return base(module, query, key, value, attention_mask, **kwargs)

    def transform_visual(self, features: Tensor, state: RunState) -> Tensor:
        """Rewrite the visual tokens leaving the projector.

        Args:
            features: the projector's output, ``(..., N, D)`` in the family's own layout
                (LLaVA: ``(num_images, N, D)``; Qwen2-VL: ``(N_total, D)``).
            state: the call in flight (``state.layout`` tells where the tokens will sit).

        Returns:
            A tensor of the same shape.
        """
        return features

    def after_forward(self, state: RunState) -> None:
        """Called after every forward (prefill or decode, ``state.phase`` tells) while the cache and
        probes of that forward are still in ``state``: e.g. evict cache entries during decode."""

    def make_cache(self, state: RunState) -> Cache | None:
        """Return the cache a prefill should start with, or ``None`` to keep transformers' own."""
        return None

    def generate(self, base_generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Replace the decoding loop of ``model.generate``; call ``base_generate`` to delegate."""
        return base_generate(*args, **kwargs)

    def report_extras(self) -> dict[str, Any]:
        """The plugin's own measurements of the last ``generate`` call, for ``session.report().extras``
        (e.g. accepted drafts per round); read once when ``generate`` returns."""
        return {}

    def token_marks(self) -> list[tuple[int, str | None]]:
        """The last generation's first row token by token, as ``(token id, label or None)``, for
        interfaces that highlight tokens (e.g. which tokens a draft proposed); ``[]`` for none."""
        return []

    def overlay(self, image: Image.Image) -> Image.Image | None:
        """``image`` (the first row's input image) with what the plugin found on it in the last
        generation drawn over it (e.g. ``region_proposal``'s map and boxes), for interfaces; ``None``
        for nothing to draw."""
        return None

    def charts(self) -> dict[str, dict[str, float]]:
        """What a user interface should plot about the last generation, as ``{title: {label:
        value}}`` bar charts (the demo draws each one), e.g. a share per layer; ``{}`` for none."""
        return {}

    @classmethod
    def do_nothing(cls) -> PluginConfig | None:
        """The setting that must reproduce the unplugged model exactly (keep every token, 16 bits,
        no drafting, ...), which the exactness matrix and ``make gpu-check`` test; every built-in
        plugin declares one (``None``: not declared)."""
        return None

    @classmethod
    def bench_settings(cls) -> dict[str, PluginConfig]:
        """The plugin's main settings, by label, that ``vtoken bench`` compares against the
        unplugged model (the one place a plugin adds itself to the benchmarks)."""
        return {}

    @property
    def multi_token_decode(self) -> bool:
        """Whether the plugin stays exact when one decode forward feeds several new tokens at once
        under a tree mask (speculative verification). Plugins that act per decode step on the
        step's single query (decode-time eviction, cache compression on a token schedule) say
        ``False``; a speculative plugin is refused beside them."""
        return True

    @property
    def speculative(self) -> bool:
        """Whether the plugin verifies several drafted tokens per decode forward."""
        return False

    def speculation_budget(self, state: RunState) -> int | None:
        """How many new cache entries the next verify forward may commit before this plugin must
        act on them (e.g. compress the decode tail); ``None``: no limit. A speculative plugin drafts
        no further, and then calls :meth:`after_accept`."""
        return None

    def after_accept(self, state: RunState) -> None:
        """Called after a verify forward's accepted tokens are kept and the rest rolled back: do the
        per-token work deferred while ``state.speculating`` was True."""

    # -- helpers for the session -----------------------------------------------------------------
    @property
    def prunes(self) -> bool:
        """Whether this plugin drops tokens (and so needs the token runtime)."""
        return self.evicts_cache or bool(self.prune_layers())

    def overrides(self, method: str) -> bool:
        """Whether this plugin's class overrides the override point ``method``."""
        return getattr(type(self), method) is not getattr(Plugin, method)
