"""Benchmarks and their synthetic data; each benchmark prints JSON so runs can be compared."""
