"""Benchmark of the APL training step and sampler against diffusers (see bench/bench.py)."""
