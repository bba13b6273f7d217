"""Benchmarks: speed (this module) and accuracy of plugins against the unplugged model."""
