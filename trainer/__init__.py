"""Slim RL trainer that uses the fused loss (installed as ``fused_canon.trainer``)."""
