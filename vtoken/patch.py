"""Reversible changes to a model: hooks, instance attributes, attention implementations.

Every change made while attached goes through a :class:`Patcher`, which records how to undo it;
``undo_all`` restores the model exactly, in reverse order, even if some undo step fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_MISSING = object()


class Patcher:
    """Applies changes to a model and remembers how to undo each of them."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def pre_hook(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        """Register ``fn(module, args, kwargs) -> None | (args, kwargs)`` before ``module.forward``."""
        self._undo.append(module.register_forward_pre_hook(fn, with_kwargs=True).remove)

    def post_hook(self, module: nn.Module, fn: Callable[..., Any], *, always: bool = False) -> None:
        """Register ``fn(module, args, kwargs, output) -> None | output`` after ``module.forward``.

        With ``always=True`` the hook also runs when the forward raises (to clean up state).
        """
        handle = module.register_forward_hook(fn, with_kwargs=True, always_call=always)
        self._undo.append(handle.remove)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute; undo deletes it again or restores the previous value."""
        old = vars(obj).get(name, _MISSING)
        setattr(obj, name, value)
        self._undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))

    def register_attention(self, key: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` under ``key`` in transformers' ``AttentionInterface`` only (a module whose
        config names ``key`` then calls it); undo restores the table's entry."""
        _register(AttentionInterface, key, fn, self._undo)

    def use_attention(
        self,
        model: PreTrainedModel,
        key: str,
        fn: Callable[..., Any],
        mask_fn: Callable[..., Any],
        sub_config: str = "text_config",
    ) -> None:
        """Register ``fn`` under ``key`` and make it the attention of one sub-model.

        The mask function is registered under the same key (without it transformers silently drops
        the padding mask); only ``sub_config``'s model (the language model by default, or
        ``"vision_config"``) switches, the rest keeps its implementation.
        """
        _register(AttentionInterface, key, fn, self._undo)
        _register(AttentionMaskInterface, key, mask_fn, self._undo)
        snapshot = attention_snapshot(model.config)
        model.set_attn_implementation({sub_config: key})
        self._undo.append(lambda: model.set_attn_implementation(snapshot))

    def undo_all(self) -> None:
        """Undo every recorded change, newest first; re-raise the first failure at the end."""
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep undoing the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def _register(interface: type, key: str, fn: Callable[..., Any], undo: list) -> None:
    # transformers offers `register` but no way to unregister; its class-wide table is a plain
    # dict, so detach restores that entry as it was.
    table = interface._global_mapping
    old = table.get(key, _MISSING)
    interface.register(key, fn)
    undo.append(lambda: table.pop(key) if old is _MISSING else table.__setitem__(key, old))


def attention_snapshot(config: Any) -> dict[str, str]:
    """``{"": impl, sub_config: impl, ...}``: the attention implementation of a model and of each of
    its sub-models, in the form ``set_attn_implementation`` accepts on every supported release
    (transformers 5.2 takes one level of sub-configs, with plain names)."""
    snap = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            snap[key] = sub._attn_implementation
    return snap


def attention_functions(
    attention_module: nn.Module, implementation: str
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The attention and mask functions behind ``implementation`` for ``attention_module``.

    A custom attention function usually wraps the one it replaces; ``"eager"`` lives in the model's
    own modeling file rather than in transformers' tables, hence this helper.
    """
    if implementation == "eager":
        fn = sys.modules[type(attention_module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[implementation]
    return fn, ALL_MASK_ATTENTION_FUNCTIONS[implementation]
