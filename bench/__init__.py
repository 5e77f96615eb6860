"""Benchmarks of the fused paths against the torch reference and peers (installed as ``fused_canon.bench``).

``fused-canon bench`` runs them (``fused_canon.bench.cli``); bench/README.md says how to run them and
how to read the table.
"""
