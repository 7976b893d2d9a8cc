"""Benchmark scripts for sevo_jax (run them as ``python benchmarks/<script>.py``; see README)."""
