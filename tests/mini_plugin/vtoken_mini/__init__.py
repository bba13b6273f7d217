"""A third-party vtoken plugin package used by the tests (found through its entry point).

``Passthrough`` exercises every override point and hook kind with do-nothing behaviour, so the
test matrix can prove that the session's plumbing alone changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

import vtoken
from vtoken import Plugin, PluginConfig, check_range
from vtoken.patch import attention_functions


@dataclass
class PassthroughConfig(PluginConfig):
    """Args:
    scale: factor applied to the visual tokens (1.0 is the do-nothing setting).
    """

    scale: float = 1.0

    def validate(self) -> None:
        check_range("passthrough.scale", self.scale, 0.0, None, low_inclusive=False)


class Passthrough(Plugin):
    name = "passthrough"
    config_class = PassthroughConfig

    def setup(self, session: vtoken.Session) -> None:
        self.calls: dict[str, int] = {"attention": 0, "layer": 0, "generate": 0, "visual": 0}
        impl = session.model.config.get_text_config()._attn_implementation
        base_attn, base_mask = attention_functions(session.parts.attention(0), impl)

        def attention(module, query, key, value, attention_mask=None, **kwargs: Any):
            self.calls["attention"] += 1
            return base_attn(module, query, key, value, attention_mask, **kwargs)

        session.patcher.use_attention(session.model, "vtoken_passthrough", attention, base_mask)
        for layer in session.parts.layers:
            session.patcher.pre_hook(layer, self._count_layer)

    def _count_layer(self, module, args, kwargs) -> None:
        self.calls["layer"] += 1

    def transform_visual(self, features: torch.Tensor, state: vtoken.RunState) -> torch.Tensor:
        self.calls["visual"] += 1
        return features * self.config.scale if self.config.scale != 1.0 else features

    def make_cache(self, state: vtoken.RunState) -> DynamicCache:
        return DynamicCache(config=self.session.model.config)

    def generate(self, base_generate, *args: Any, **kwargs: Any) -> Any:
        self.calls["generate"] += 1
        return base_generate(*args, **kwargs)


class NotAPlugin:
    """Registered under a bad entry point to test error containment."""
