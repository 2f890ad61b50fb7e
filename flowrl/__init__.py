"""flowrl: reinforcement-learning fine-tuning of denoising generative models.

The seam (see DESIGN.md): a model adapter answers "what is your prediction at (x_t, t, c)?",
a sampler turns the denoising chain into an MDP with exact per-step Gaussian log-probs and
writes a :class:`~flowrl.chain.Chain`, and one policy-gradient core optimizes the chain.
"""

__version__ = "0.1.0"

from flowrl.chain import Chain  # noqa: E402

__all__ = ["Chain", "__version__"]
