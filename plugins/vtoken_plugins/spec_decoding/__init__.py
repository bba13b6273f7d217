"""``spec_decoding``: SpecVLM's lossless speculative decoding (EAGLE-2 trees, elastic visual compressor)."""

from vtoken_plugins.spec_decoding.config import SpecDecodingConfig
from vtoken_plugins.spec_decoding.plugin import SpecDecoding

__all__ = ["SpecDecoding", "SpecDecodingConfig"]
