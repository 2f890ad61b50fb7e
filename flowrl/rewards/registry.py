"""Reward registry, loading by name or path, validation, weighting and asynchronous scoring.

A reward function scores a batch of final samples:

    reward_fn(images, prompts, metadata) -> (rewards, info)

    images   (B, 3, H, W) float tensor in [0, 1]
    prompts  list of B strings
    metadata list of B dicts (free-form, e.g. the prompt's class)
    rewards  (B,) tensor, array or list of finite floats
    info     dict of extra per-batch values to log (may be empty)

Built-in rewards are modules of this package (``flowrl.rewards.jpeg``, ``aesthetic``,
``clip_score``, ``preference``; the demo's ``flowrl.demo.rewards``) whose *factories* are registered
by name: ``@register_reward("jpeg_compressibility")`` on a function that
takes keyword options and returns a reward function (heavy imports happen inside the factory).
A user's reward is a Python file given by path, ``rewards/my_reward.py`` or
``path/to/file.py:function_name``; the file defines either ``reward_fn(images, prompts, metadata)``
or a factory ``make_reward(**kwargs)`` that returns one, or registers factories like the built-ins.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

RewardFn = Callable[[Tensor, list[str], list[dict]], tuple]


@dataclass
class RewardEntry:
    factory: Callable[..., RewardFn]
    differentiable: bool
    source: str


_REGISTRY: dict[str, RewardEntry] = {}
_BUILTINS_LOADED = False


class RewardError(RuntimeError):
    """A reward raised, or returned something that is not B finite floats."""


class UnknownRewardError(RewardError, KeyError):
    """No reward by that name, or a reward script without a reward function. A KeyError too, for
    callers that catch lookups; printed as its plain message (not KeyError's quoted repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register_reward(name: str, differentiable: bool = False):
    """Register a reward factory under ``name``: ``@register_reward("aesthetic", differentiable=True)``."""

    def wrap(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if not callable(factory):
            raise TypeError(f"@register_reward({name!r}) must decorate a factory function")
        existing = _REGISTRY.get(name)
        source = getattr(factory, "__module__", "?")
        if existing is not None and existing.source != source:
            raise ValueError(f"reward name {name!r} is registered twice ({existing.source} and {source})")
        _REGISTRY[name] = RewardEntry(factory, differentiable, source)
        return factory

    return wrap


def example_rewards_dir() -> Path:
    """The folder of example reward scripts users copy and edit: ``flowrl/_rewards`` in an
    installed wheel, else the checkout's top-level ``rewards/``."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "_rewards", here.parent / "rewards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("flowrl's example rewards folder is missing; reinstall flowrl")


def _import_file(path: Path):
    module_name = f"flowrl_reward_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"cannot import reward script {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(
            f"reward script {path} failed to import: {type(e).__name__}: {e}; fix the script "
            f"(python {path} shows the full error)"
        ) from e
    return module


# the modules whose @register_reward factories are the built-in rewards (imported on first lookup,
# so a heavy reward's imports cost nothing until it is used)
BUILTIN_MODULES = (
    "flowrl.rewards.jpeg",
    "flowrl.rewards.aesthetic",
    "flowrl.rewards.clip_score",
    "flowrl.rewards.preference",
    "flowrl.demo.rewards",
)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        import importlib

        for name in BUILTIN_MODULES:
            importlib.import_module(name)
        _BUILTINS_LOADED = True


def available_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def resolve_reward(spec: str) -> tuple[Callable[..., RewardFn], bool]:
    """A (factory, differentiable) pair for a registered name or ``file.py[:name]``."""
    path_part, _, attr = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    if not path_part.endswith(".py"):
        _load_builtins()
        if spec not in _REGISTRY:
            close = difflib.get_close_matches(spec, list(_REGISTRY), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownRewardError(
                f"unknown reward {spec!r}.{hint} Built-in rewards: {', '.join(sorted(_REGISTRY))}; "
                "or give a path to your own script, e.g. rewards/my_reward.py"
            )
        return _REGISTRY[spec].factory, _REGISTRY[spec].differentiable

    path = Path(path_part).expanduser()
    if not path.is_file() and path.parent.name == "rewards" and (example_rewards_dir() / path.name).is_file():
        path = example_rewards_dir() / path.name  # rewards/<file>.py from an installed package
    if not path.is_file():
        raise FileNotFoundError(
            f"reward script {spec!r} not found (looked for {path.resolve()}); give the path of a .py file "
            "defining reward_fn(images, prompts, metadata), or a built-in reward name"
        )
    module = _import_file(path)
    registered = [n for n, e in _REGISTRY.items() if e.source == module.__name__]
    differentiable = bool(getattr(module, "DIFFERENTIABLE", False))
    if attr in registered:
        return _REGISTRY[attr].factory, _REGISTRY[attr].differentiable
    name = attr or next((n for n in ("make_reward", "reward_fn") if hasattr(module, n)), None)
    if name is None and len(registered) == 1:
        return _REGISTRY[registered[0]].factory, _REGISTRY[registered[0]].differentiable
    if name is None or not callable(getattr(module, name, None)):
        raise UnknownRewardError(
            f"reward script {path} defines no {attr!r}"
            if attr
            else f"reward script {path} defines neither reward_fn(images, prompts, metadata) nor make_reward(**kwargs)"
            + (f"; it registers {registered}: pick one with {path}:<name>" if registered else "")
        )
    fn = getattr(module, name)
    if name.startswith("make_"):
        return fn, differentiable

    def plain(**kwargs) -> RewardFn:
        kwargs.pop("device", None)
        if kwargs:
            raise TypeError(
                f"{name} takes no options but got {sorted(kwargs)}; define make_reward(**kwargs) to accept options"
            )
        return fn

    return plain, differentiable


def validate_rewards(
    name: str, out, batch_size: int, device: torch.device | str = "cpu", allow_nonfinite: bool = False
) -> tuple[Tensor, dict]:
    """Check a reward's output: B finite floats (and an optional info dict). With
    ``allow_nonfinite`` NaN / inf pass through, for a caller that reports them in context."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        values, info = out
    else:
        values, info = out, {}
    kind = values.dtype.is_complex if isinstance(values, Tensor) else None
    if isinstance(values, Tensor) and values.device.type == "meta":
        raise RewardError(
            f"reward {name!r} returned a tensor on the meta device, which holds no values: "
            "compute the rewards on the images' device (or the CPU) and return them from there"
        )
    if kind or (not isinstance(values, Tensor) and np.asarray(values).dtype.kind == "c"):
        raise RewardError(
            f"reward {name!r} returned complex numbers: rewards must be real; return a (B,) float tensor "
            "(e.g. the magnitude, values.abs())"
        )
    try:
        if isinstance(values, Tensor):
            values = values.detach() if not values.requires_grad else values
            tensor = values.to(device=device, dtype=torch.float32)
        else:
            tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32, device=device)
    except (TypeError, ValueError) as e:
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, which is not numbers: return a (B,) tensor of floats"
        ) from e
    if tensor.shape != (batch_size,):
        raise RewardError(
            f"reward {name!r} returned shape {tuple(tensor.shape)} for a batch of {batch_size} images: "
            f"it must return one float per image, shape ({batch_size},)"
        )
    bad = ~torch.isfinite(tensor)
    if not allow_nonfinite and bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(
            f"reward {name!r} returned non-finite values (NaN or inf) at batch positions {idx}: fix the reward or clamp its output"
        )
    return tensor, info


class Reward:
    """A weighted sum of reward functions, validated, optionally scored in a background thread.

    Args:
        specs: list of ``{"name": str, "weight": float, "kwargs": dict}``; ``name`` is a registered
            reward or a path ``file.py[:function]``.
        device: where images are scored.
        allow_nonfinite: let NaN / inf values through instead of raising (the trainer does, to
            report them with the epoch and prompts and to honour ``train.on_nonfinite``).
        combine: how the weighted terms w_i r_i make the total, for an ensemble of reward models
            against over-optimisation (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
            Overoptimization", arXiv 2310.02743): ``sum`` (a weighted sum of different rewards),
            ``mean``, ``wco`` (worst-case: the minimum over members) or ``uwo`` (uncertainty-weighted:
            the mean minus ``uwo_coef`` x the variance over members).
        uwo_coef: lambda of ``uwo``.
    """

    COMBINE = ("sum", "mean", "wco", "uwo")

    def __init__(
        self,
        specs: list[dict],
        device: torch.device | str = "cpu",
        allow_nonfinite: bool = False,
        combine: str = "sum",
        uwo_coef: float = 1.0,
    ):
        if combine not in self.COMBINE:
            raise ValueError(f"reward combine must be one of {self.COMBINE}, got {combine!r}")
        if combine in ("wco", "uwo") and len(specs) < 2:
            raise ValueError(
                f"reward combine {combine!r} needs an ensemble of at least 2 rewards, got {len(specs)}"
            )
        self.combine, self.uwo_coef = combine, uwo_coef
        self.allow_nonfinite = allow_nonfinite
        if not specs:
            raise ValueError("no reward given: set rewards: [{name: jpeg_compressibility}] in the task file")
        self.device = device
        self.terms: list[tuple[str, float, RewardFn]] = []
        self.differentiable = True
        for spec in specs:
            name = spec["name"]
            factory, differentiable = resolve_reward(name)
            kwargs = dict(spec.get("kwargs") or {})
            fn = factory(device=device, **kwargs) if _accepts(factory, "device") else factory(**kwargs)
            self.terms.append((name, float(spec.get("weight", 1.0)), fn))
            self.differentiable &= differentiable
        self._pool: ThreadPoolExecutor | None = None

    def __call__(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[Tensor, dict]:
        """(B,) weighted total and an info dict with each term's (B,) values under ``reward/<name>``."""
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        members: list[Tensor] = []
        info: dict = {}
        for name, weight, fn in self.terms:
            try:
                out = fn(images, prompts, metadata)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(
                    f"reward {name!r} raised {type(e).__name__}: {e}; fix the reward function (the traceback "
                    "above shows where), or call flowrl.rewards.Reward on a small batch to debug it alone"
                ) from e
            values, extra = validate_rewards(name, out, len(prompts), self.device, self.allow_nonfinite)
            members.append(weight * values)
            info[f"reward/{Path(name).stem if name.endswith('.py') else name}"] = values.detach()
            info.update({f"{name}/{k}": v for k, v in extra.items()})
        stacked = torch.stack(members)  # (T, B) the weighted terms
        if self.combine == "sum":
            total = stacked.sum(0)
        elif self.combine == "mean":
            total = stacked.mean(0)
        elif self.combine == "wco":
            total = stacked.min(0).values
        else:
            total = stacked.mean(0) - self.uwo_coef * stacked.var(0, unbiased=False)
        if len(members) > 1:
            info["reward/ensemble_std"] = stacked.std(0, unbiased=False).detach()
        return total, info

    def submit(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> Future:
        """Score in a background thread, so the next batch can be sampled meanwhile."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-reward")
        return self._pool.submit(self.__call__, images, prompts, metadata)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
