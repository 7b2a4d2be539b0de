"""Adaptation training: turn an AR causal LM into a masked diffusion LM (arXiv 2410.17891)."""
