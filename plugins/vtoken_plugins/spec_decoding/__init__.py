"""``spec_decoding``: SpecVLM's speculative decoding (EAGLE-2 draft trees, elastic visual compressor)."""
