"""Benchmarks of the fused paths against the torch reference and peers (installed as ``fused_canon.bench``)."""
