"""Triton kernels of fused-canon (installed as ``fused_canon.kernels``)."""
