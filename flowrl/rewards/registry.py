"""Reward registry, loading by name or path, validation, weighting and asynchronous scoring.

A reward function scores a batch of final samples:

    reward_fn(images, prompts, metadata) -> (rewards, info)

    images   (B, 3, H, W) float tensor in [0, 1]
    prompts  list of B strings
    metadata list of B dicts (free-form, e.g. the prompt's class)
    rewards  (B,) tensor, array or list of finite floats
    info     dict of extra per-batch values to log (may be empty): numbers, or tensors / arrays /
             lists of numbers, logged as their mean under ``reward_info/<reward>/<key>``

Built-in rewards are modules of this package (``flowrl.rewards.jpeg``, ``aesthetic``,
``clip_score``, ``preference``; the demo's ``flowrl.demo.rewards``) whose *factories* are registered
by name: ``@register_reward("jpeg_compressibility")`` on a function that
takes keyword options and returns a reward function (heavy imports happen inside the factory).
A user's reward is a Python file given by path, ``rewards/my_reward.py`` or
``path/to/file.py:function_name``; the file defines either ``reward_fn(images, prompts, metadata)``
or a factory ``make_reward(**kwargs)`` that returns one, or registers factories like the built-ins.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowrl.errors import ConfigError, FlowrlError, MissingFileError

RewardFn = Callable[[Tensor, list[str], list[dict]], tuple]


@dataclass
class RewardEntry:
    factory: Callable[..., RewardFn]
    differentiable: bool
    source: str


_REGISTRY: dict[str, RewardEntry] = {}
_BUILTINS_LOADED = False


class RewardError(FlowrlError, RuntimeError):
    """A reward raised (``SystemExit`` and ``KeyboardInterrupt`` included), did not return within
    its timeout, or returned something that is not B finite floats."""


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
    except BaseException as e:  # sys.exit() or Ctrl-C at import too: an error naming the script
        del sys.modules[module_name]
        if isinstance(e, KeyboardInterrupt):
            raise RewardError(
                f"reward script {path} was interrupted while importing (KeyboardInterrupt)"
            ) from e
        what = f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        raise RewardError(
            f"reward script {path} failed to import: {what}; fix the script "
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
    "flowrl.rewards.geneval",
    "flowrl.rewards.imagereward",
    "flowrl.rewards.ocr",
    "flowrl.rewards.remote",
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
        raise MissingFileError(
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
            raise ConfigError(
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
        timeout: seconds a batch's scoring may take (the task's ``reward_timeout``); past it the
            run stops with a RewardError naming the reward (null: no limit). Scoring then runs in
            flowrl's one daemon reward thread, so a reward that never returns cannot hang the run
            or the interpreter's exit. A call on images that need gradients (reward backprop,
            reward-gradient guidance) runs there too, under the caller's grad mode and autocast
            (both thread-local, :func:`guarded`): autograd's graph is not tied to the thread that
            built it, so the caller's backward runs through the reward as if it were inline.
        timeout_option: the option that sets ``timeout``, named in the timeout's message.
    """

    COMBINE = ("sum", "mean", "wco", "uwo")

    def __init__(
        self,
        specs: list[dict],
        device: torch.device | str = "cpu",
        allow_nonfinite: bool = False,
        combine: str = "sum",
        uwo_coef: float = 1.0,
        timeout: float | None = None,
        timeout_option: str = "reward_timeout",
    ):
        if combine not in self.COMBINE:
            raise ConfigError(f"reward combine must be one of {self.COMBINE}, got {combine!r}")
        if combine in ("wco", "uwo") and len(specs) < 2:
            raise ConfigError(
                f"reward combine {combine!r} needs an ensemble of at least 2 rewards, got {len(specs)}"
            )
        self.combine, self.uwo_coef, self.timeout = combine, uwo_coef, timeout
        self.timeout_option = timeout_option
        self.allow_nonfinite = allow_nonfinite
        if not specs:
            raise ConfigError("no reward given: set rewards: [{name: jpeg_compressibility}] in the task file")
        self.device = device
        self.terms: list[tuple[str, float, RewardFn]] = []
        self.differentiable = True
        for spec in specs:
            name = spec["name"]
            factory, differentiable = resolve_reward(name)
            kwargs = dict(spec.get("kwargs") or {})
            try:
                fn = factory(device=device, **kwargs) if _accepts(factory, "device") else factory(**kwargs)
            except FlowrlError:
                raise
            except TypeError as e:  # options the factory does not take
                raise ConfigError(
                    f"reward {name!r}: its options {kwargs} do not fit its factory ({e}); fix the reward's kwargs"
                ) from e
            except BaseException as e:  # the factory raised, or called sys.exit()
                if isinstance(e, KeyboardInterrupt) and not name.endswith(".py"):
                    raise
                raise RewardError(
                    f"reward {name!r} failed to build: {_what(e)}; fix the reward or its kwargs"
                ) from e
            if not callable(fn):
                raise RewardError(
                    f"reward {name!r}: its factory returned {type(fn).__name__}, not a function; "
                    "make_reward(**kwargs) must return reward_fn(images, prompts, metadata)"
                )
            self.terms.append((name, float(spec.get("weight", 1.0)), fn))
            self.differentiable &= differentiable
        self._worker: _Worker | None = None
        self._current = ""  # the term being scored, for a timeout's message

    def __call__(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[Tensor, dict]:
        """(B,) weighted total and an info dict with each term's (B,) values under ``reward/<name>``."""
        if self.timeout is not None:
            return self.submit(images, prompts, metadata).result()
        return self._score(images, prompts, metadata)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> tuple[Tensor, dict]:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        members: list[Tensor] = []
        info: dict = {}
        for name, weight, fn in self.terms:
            self._current = name
            try:
                out = fn(images, prompts, metadata)
            except RewardError:
                raise
            except BaseException as e:  # SystemExit and KeyboardInterrupt too: never a clean exit of the run
                raise reward_call_error(name, e) from e
            values, extra = validate_rewards(name, out, len(prompts), self.device, self.allow_nonfinite)
            members.append(weight * values)
            label = Path(name).stem if name.endswith(".py") else name
            info[f"reward/{label}"] = values.detach()
            info.update({f"reward_info/{label}/{k}": v for k, v in extra.items()})
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

    def submit(self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None) -> _Pending:
        """Score in the background reward thread (batches in order), so the next batch can be
        sampled meanwhile; ``.result()`` waits at most ``timeout`` seconds from the batch's start."""
        if self._worker is None or self._worker.stuck:
            self._worker = _Worker()
        return self._worker.put(
            lambda: self._score(images, prompts, metadata),
            lambda: self._current or self.terms[0][0],
            self.timeout,
            f"a batch of {len(prompts)} images",
            self.timeout_option,
        )

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def info_scalar(value) -> float | None:
    """A reward's info value as one number to log: a number, or the mean of a tensor, array or list
    of numbers; None for anything else (a string, an empty list)."""
    try:
        if isinstance(value, Tensor):
            value = value.detach().float().cpu().numpy()
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(arr.mean()) if arr.size else None


def mean_info(infos: list[dict]) -> dict[str, float]:
    """The ``reward_info/`` entries of several batches' info dicts as numbers (:func:`info_scalar`),
    each the mean over the batches that have it as a number."""
    values: dict[str, list[float]] = {}
    for info in infos:
        for k, v in info.items():
            x = info_scalar(v) if k.startswith("reward_info/") else None
            if x is not None:
                values.setdefault(k, []).append(x)
    return {k: sum(xs) / len(xs) for k, xs in values.items()}


def _what(e: BaseException) -> str:
    return f"called sys.exit({e.code!r})" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"


def reward_call_error(name: str, e: BaseException) -> RewardError:
    """The RewardError for a reward ``name`` that raised ``e`` (``SystemExit`` and
    ``KeyboardInterrupt`` included: never a clean exit of the run) while scoring."""
    if isinstance(e, SystemExit):
        return RewardError(
            f"reward {name!r} called sys.exit({e.code!r}) while scoring; a reward must return its values "
            "(raise an exception to report a problem)"
        )
    if isinstance(e, KeyboardInterrupt):
        return RewardError(f"reward {name!r} was interrupted (KeyboardInterrupt) while scoring")
    return RewardError(
        f"reward {name!r} raised {type(e).__name__}: {e}; fix the reward function (the traceback "
        "above shows where), or call flowrl.rewards.Reward on a small batch to debug it alone"
    )


class guarded:
    """A reward call made safe: ``guarded(name, timeout)(fn, *args)`` runs ``fn(*args)`` in a
    daemon reward thread and waits at most ``timeout`` seconds (None: no limit, then inline);
    a raise, ``sys.exit()`` or ``KeyboardInterrupt`` inside it is a RewardError naming the reward.
    For rewards outside :class:`Reward`: the robot action rewards of ``flowrl evaluate --guide``.

    The call runs under the caller's grad mode and autocast (thread-local state), so a reward on
    inputs that need gradients returns a graph the caller differentiates as if it were inline.
    """

    def __init__(self, name: str, timeout: float | None, timeout_option: str = "reward_timeout"):
        self.name, self.timeout, self.timeout_option = name, timeout, timeout_option
        self._worker: _Worker | None = None

    def __call__(self, fn: Callable, *args, what: str = "a batch"):
        def run():
            try:
                return fn(*args)
            except FlowrlError:
                raise
            except BaseException as e:
                raise reward_call_error(self.name, e) from e

        if self.timeout is None:
            return run()
        if self._worker is None or self._worker.stuck:
            self._worker = _Worker()
        return self._worker.put(run, lambda: self.name, self.timeout, what, self.timeout_option).result()


def _thread_state() -> Callable[[], contextlib.ExitStack]:
    """The calling thread's grad mode and autocast (per device type), to re-enter in another
    thread: both are thread-local, and a reward thread must score as the caller would inline."""
    grad = torch.is_grad_enabled()
    casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(grad))
        for device_type, dtype in casts:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        return stack

    return enter


class _Pending:
    """A call submitted to the reward thread; :meth:`result` as a Future's, with the timeout."""

    def __init__(self, worker: _Worker, name: Callable[[], str], timeout, what: str, option: str):
        self.worker, self.name, self.timeout, self.what, self.option = worker, name, timeout, what, option
        self.future: Future = Future()
        self.started = threading.Event()
        self.start_time = 0.0

    def result(self, timeout: float | None = None):
        limit = self.timeout
        if limit is None:
            return self.future.result()
        if self.started.wait(limit):
            remaining = limit - (time.monotonic() - self.start_time)
            try:
                return self.future.result(timeout=max(remaining, 0.0))
            except TimeoutError:
                pass
        self.worker.stuck = True  # the thread stays busy; the next call gets a fresh one
        raise RewardError(
            f"reward {self.name()!r} did not return within {self.option}={limit:g} s for {self.what}; "
            f"make it faster, or raise {self.option}"
            + (" (null for no limit)" if self.option == "reward_timeout" else "")
        )


class _Worker:
    """One daemon thread running reward calls in order (a hung reward cannot block the
    interpreter's exit, as a ThreadPoolExecutor's worker does)."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.stuck = False
        self.thread = threading.Thread(target=self._loop, name="flowrl-reward", daemon=True)
        self.thread.start()

    def put(self, fn: Callable, name: Callable[[], str], timeout, what: str, option: str) -> _Pending:
        pending = _Pending(self, name, timeout, what, option)
        self.jobs.put((pending, fn, _thread_state()))
        return pending

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            pending, fn, state = job
            pending.start_time = time.monotonic()
            pending.started.set()
            try:
                with state():
                    pending.future.set_result(fn())
            except BaseException as e:  # the callers make a reward's own a RewardError; others as is
                pending.future.set_exception(e)


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
