"""dlm-harness: benchmark diffusion language models against autoregressive baselines.

``harness.evaluate(model=..., tasks=[...], ...)`` runs an evaluation from Python (see ``harness.api``).
"""

__version__ = "0.1.0"


def evaluate(*args, **kwargs):
    """``harness.api.evaluate`` (imported on first use, so ``import harness`` stays light)."""
    from harness.api import evaluate as run

    return run(*args, **kwargs)
