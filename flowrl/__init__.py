"""flowrl: reinforcement-learning fine-tuning of denoising generative models.

The seam (docs/architecture.md): a model adapter (text-to-image network or robot policy) answers
"what is your prediction at (x_t, t, c)?", a sampler turns the denoising chain into an MDP with
exact per-step Gaussian log-probs, a collector (prompts and rewards, or vector environments)
fills a :class:`~flowrl.chain.Chain`, and one update loop optimizes it with any objective.
"""

__version__ = "0.2.0"

from flowrl.chain import Chain  # noqa: E402

__all__ = ["Chain", "__version__"]
