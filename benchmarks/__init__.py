"""Kasmina benchmarks: `python -m benchmarks` runs them all and gathers the tables."""
