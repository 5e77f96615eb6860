"""fused-canon: fused policy-gradient loss for RL training of language models."""
