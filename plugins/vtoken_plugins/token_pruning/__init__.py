"""``token_pruning``: dynamic visual-token pruning in prefill (FastV family)."""

from vtoken_plugins.token_pruning.config import TokenPruningConfig
from vtoken_plugins.token_pruning.plugin import TokenPruning

__all__ = ["TokenPruning", "TokenPruningConfig"]
