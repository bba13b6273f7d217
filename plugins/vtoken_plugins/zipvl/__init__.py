"""ZipVL: dynamic per-layer ratios, sparse prefill attention and a mixed-precision / evicting KV cache."""

from vtoken_plugins.zipvl.config import ZipVLConfig
from vtoken_plugins.zipvl.plugin import ZipVL

__all__ = ["ZipVL", "ZipVLConfig"]
