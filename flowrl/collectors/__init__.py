"""Collectors: the only domain-specific part of training. A collector fills an epoch's Chain and
knows nothing about losses.

    text_to_image   prompts -> sample -> decode -> reward -> advantages (per prompt, group, ...)
    env             vector envs -> action chunks -> env rewards -> values -> GAE

The task's ``kind`` picks one; :class:`~flowrl.collectors.base.Collector` is the contract. A new
domain is one file plus an entry in :data:`COLLECTORS`.
"""

from __future__ import annotations

import importlib

# kind -> "module:Class", imported on demand (the env collector pulls in gymnasium)
COLLECTORS = {
    "text_to_image": "flowrl.collectors.text_to_image:TextToImageCollector",
    "env": "flowrl.collectors.env:EnvCollector",
}


def collector_class(kind: str):
    """The Collector subclass of a task kind."""
    if kind not in COLLECTORS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {list(COLLECTORS)}")
    module, _, cls = COLLECTORS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["COLLECTORS", "collector_class"]
