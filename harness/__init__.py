"""dlm-harness: benchmark diffusion language models against autoregressive baselines."""

__version__ = "0.1.0"
