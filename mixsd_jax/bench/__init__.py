"""Benchmarks and the memory/TPU plan: the top of the import order (only cli imports it)."""
