"""Benchmarks, measurement tools and the local multi-process harness (not part of the installed package)."""
