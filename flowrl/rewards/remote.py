"""The ``remote`` reward: a reward model served by ``flowrl serve-reward`` (:mod:`flowrl.rewards.server`),
scored over HTTP as an ordinary reward.

    rewards:
      - name: remote
        kwargs: {url: "http://127.0.0.1:8765", timeout: 60, retries: 3}

Each batch is one ``POST /score`` (the wire format is in :mod:`flowrl.rewards.server`); with
``train.async_reward`` it is sent from flowrl's reward thread, so the next batch samples while
the server scores. A request that cannot connect, is cut off, times out or gets a 502/503/504 is
retried ``retries`` times, waiting ``backoff`` x 2^i seconds before retry i; then the run stops
with a RewardError naming the URL (``flowrl train`` exits with code 2, the checkpoints written so
far intact, ``train.resume=auto`` continues once the server is back). A request the server
refuses (malformed, or the reward raised) is not retried.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import torch

from flowrl.errors import ConfigError
from flowrl.rewards.registry import RewardError, register_reward
from flowrl.rewards.server import DTYPES, encode_request

RETRY_STATUS = (502, 503, 504)  # a proxy, or a server starting or overloaded: worth another try


@register_reward("remote")
def remote(
    url: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 0.5,
    encoding: str = "float32",
    device: str | torch.device = "cpu",
):
    """A reward served at ``url`` (``http://host:port`` of ``flowrl serve-reward``).

    Args:
        url: the server's address.
        timeout: seconds one request may wait for the server (to connect, and between bytes of
            the answer) before it counts as failed.
        retries: further attempts after a failed one (0: none).
        backoff: seconds before the first retry, doubling after each.
        encoding: how images travel: ``float32`` (exact, the rewards equal the local reward's),
            ``float16`` (half the bytes) or ``uint8`` (a quarter, as a saved PNG would score).
        device: where the returned rewards are put.
    """
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(
            f"reward 'remote' needs kwargs.url, the http://host:port of a flowrl serve-reward server; got {url!r}"
        )
    if not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise ConfigError(
            f"reward 'remote': kwargs.timeout must be a positive number of seconds, got {timeout!r}"
        )
    if not (isinstance(retries, int) and retries >= 0):
        raise ConfigError(f"reward 'remote': kwargs.retries must be an integer >= 0, got {retries!r}")
    if not (isinstance(backoff, (int, float)) and 0 <= backoff < float("inf")):
        raise ConfigError(f"reward 'remote': kwargs.backoff must be >= 0 seconds, got {backoff!r}")
    if encoding not in DTYPES:
        raise ConfigError(
            f"reward 'remote': kwargs.encoding must be one of {sorted(DTYPES)}, got {encoding!r}"
        )
    client = RemoteClient(url.rstrip("/"), float(timeout), retries, float(backoff))
    health = client.request("/health")
    if health.get("protocol") != 1:
        raise RewardError(
            f"the server at {url} speaks reward protocol {health.get('protocol')!r}, this flowrl 1; "
            "run the same flowrl version on both sides"
        )

    def reward_fn(images, prompts, metadata):
        x = images.detach().to("cpu", torch.float32).numpy()  # (B, C, H, W)
        if encoding == "uint8":
            x = (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        else:
            x = x.astype(DTYPES[encoding])
        try:
            body = encode_request(x, list(prompts), list(metadata))
        except TypeError as e:  # json: metadata holding tensors, sets, objects
            raise RewardError(
                f"reward 'remote' ({url}): the prompts' metadata cannot be sent as JSON ({e}); keep metadata "
                "to strings, numbers, lists and dicts"
            ) from None
        answer = client.request("/score", body)
        rewards = answer.get("rewards")
        if not isinstance(rewards, list) or len(rewards) != len(prompts):
            raise RewardError(
                f"the reward server at {url} answered {type(rewards).__name__} for {len(prompts)} images, not "
                f"{len(prompts)} rewards; check that it is a flowrl serve-reward server"
            )
        info = {
            k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
            for k, v in (answer.get("info") or {}).items()
        }
        return torch.tensor(rewards, dtype=torch.float32, device=device), info

    return reward_fn


class RemoteClient:
    """JSON answers from a reward server, with the timeout and retries of :func:`remote`."""

    def __init__(self, url: str, timeout: float, retries: int, backoff: float):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff

    def request(self, path: str, body: bytes | None = None) -> dict:
        """GET ``path`` (or POST ``body`` to it); the answer's JSON. Raises RewardError naming the
        URL when every attempt failed or the server refused the request."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=body, method="POST" if body else "GET")
            if body is not None:
                req.add_header("Content-Type", "application/octet-stream")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as answer:
                    text = answer.read()
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRY_STATUS:
                    raise RewardError(
                        f"the reward server at {self.url} refused the request (HTTP {e.code}): {message}"
                        + (
                            "; fix the served reward (the server's log has the traceback)"
                            if e.code == 500
                            else ""
                        )
                    ) from None
                last = f"HTTP {e.code}: {message}"
                continue
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    last = f"no answer within timeout={self.timeout:g} s"
                else:
                    last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                continue
            try:
                return json.loads(text)
            except ValueError:
                raise RewardError(
                    f"the server at {self.url} answered {path} with something that is not JSON; check that "
                    "kwargs.url is a flowrl serve-reward server"
                ) from None
        attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        raise RewardError(
            f"the reward server at {self.url} did not answer ({last}; {attempts}); start it with "
            f"`flowrl serve-reward <reward> --port {urllib.parse.urlsplit(self.url).port or 80}` "
            "or fix the remote reward's kwargs.url (a stopped run resumes with train.resume=auto)"
        )


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except (ValueError, AttributeError, OSError):
        return str(e.reason)
