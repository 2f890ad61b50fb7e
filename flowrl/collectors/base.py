"""The collector contract: what the run shell asks of a domain.

A collector is built by the run shell (:class:`flowrl.run.Run`) once the model and sampler
exist, and answers, epoch by epoch:

    collect(epoch)        -> (Chain, stats)   the epoch's trajectories with their rewards
    advantages(chain)     -> ((B,), info)     from statistics over every process
    evaluate(epoch)       -> metrics          deterministic, fixed seeds; writes grids / videos
    describe(chain, rows) -> str              which inputs a row came from (for error messages)

and declares, as class attributes, what the config layer needs without building anything:
``DEFAULTS`` (the kind's layer of defaults), ``ADVANTAGES`` (the estimators it supports; the
first is its default), ``SEED_SCHEME`` (see :mod:`flowrl.core.seeding`), and ``validate(cfg)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from flowrl.chain import Chain


class Collector:
    """The base of every collector (see the module docstring).

    Args:
        cfg: the validated task config.
        run: the :class:`~flowrl.run.Run` that owns the accelerator, seeds, model, sampler and run folder.
    """

    kind: str = ""
    DEFAULTS: dict = {}
    ADVANTAGES: tuple[str, ...] = ()
    SEED_SCHEME: str = "text_to_image"

    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run

    @classmethod
    def validate(cls, cfg) -> None:
        """Config-time checks of the kind's own settings (raise ConfigError)."""

    @classmethod
    def check(cls, cfg, task_name: str) -> None:
        """Checks that read files but load no weights (prompt files, reward scripts, the model
        folder), run before the accelerator and the model are built."""

    # ------------------------------------------------------------------ what the shell calls
    def value_function(self) -> nn.Module | None:
        """A value network to train beside the policy (GAE), or None."""
        return None

    def demonstrations(self) -> tuple[Tensor, Tensor] | None:
        """Normalized (obs, actions) windows for a behavior-cloning term, or None."""
        return None

    def collect(self, epoch: int) -> tuple[Chain, dict]:
        raise NotImplementedError

    def advantages(self, chain: Chain) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def describe(self, chain: Chain, rows: list[int]) -> str:
        return f"trajectories {rows[:4]}{'...' if len(rows) > 4 else ''}"

    def evaluate(self, epoch: int) -> dict:
        return {}

    def plot(self, rows: list[dict]) -> None:
        """Write the run's curve (a PNG a person opens) from the metrics rows so far."""

    def postfix(self, row: dict) -> dict:
        """What the progress bar shows after an epoch."""
        return {}

    def summary(self, history: list[dict]) -> list[str]:
        """The lines ``flowrl train`` prints at the end."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass
