"""A reward served over HTTP (``flowrl serve-reward``), so a heavy reward model runs in its own
process, environment or machine; the training side uses it as the ``remote`` reward
(:mod:`flowrl.rewards.remote`).

    flowrl serve-reward aesthetic --port 8765            # any registered reward, or a script path
    rewards: [{name: remote, kwargs: {url: "http://127.0.0.1:8765"}}]

Requests are scored in batches: concurrent requests (several runs, or several processes of one
run) are merged into batches of up to ``max_batch`` images of the same size, a request larger than
that is split, and each request gets its own rows back. The server binds the loopback interface
unless told otherwise; it has no authentication, so bind another address only on a network you
trust.

Wire format, version 1 (no pickle: images are raw numbers, the rest is JSON):

    POST /score   body = N (4 bytes, big-endian unsigned) | header (N bytes, UTF-8 JSON) | images
        header  {"shape": [B, C, H, W], "dtype": "float32" | "float16" | "uint8",
                 "prompts": [B strings], "metadata": [B JSON objects]}
        images  B*C*H*W values of ``dtype``, little-endian, C order: floats in [0, 1], or uint8
                where v means v / 255
        200     {"rewards": [B numbers], "info": {key: number | [B numbers]}}  (NaN / Infinity as
                Python's json writes them; the client checks them as a local reward's)
        400     {"error": "..."}: a malformed request (not retried by the client)
        413     {"error": "..."}: larger than ``max_request_mb``
        500     {"error": "..."}: the reward raised (its traceback goes to the server's stderr)
    GET /health   200 {"status": "ok", "protocol": 1, "reward": name, "differentiable": bool,
                       "max_batch": n}

A reward's info values come back per request: a per-image array (length of the scored batch) as
that request's B values, anything else as a number (the mean; a request scored in several
batches gets the mean over its rows).
"""

from __future__ import annotations

import ipaddress
import json
import queue
import struct
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from flowrl.errors import ConfigError
from flowrl.rewards.registry import Reward, RewardError, resolve_reward, validate_rewards

PROTOCOL = 1
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "uint8": np.dtype("u1")}


class BadRequest(ValueError):
    """A request that does not follow the wire format (HTTP 400)."""


def encode_request(images: np.ndarray, prompts: list[str], metadata: list[dict]) -> bytes:
    """The body of ``POST /score`` for (B, C, H, W) ``images`` of a :data:`DTYPES` type."""
    dtype = next(name for name, d in DTYPES.items() if d == images.dtype)
    header = json.dumps(
        {"shape": list(images.shape), "dtype": dtype, "prompts": prompts, "metadata": metadata}
    ).encode()
    return struct.pack(">I", len(header)) + header + np.ascontiguousarray(images, DTYPES[dtype]).tobytes()


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict]]:
    """(images (B, C, H, W) float32 in [0, 1], prompts, metadata) of a ``POST /score`` body."""
    if len(body) < 4:
        raise BadRequest("the body is shorter than its 4-byte header length")
    (n,) = struct.unpack(">I", body[:4])
    if 4 + n > len(body):
        raise BadRequest(f"the header length {n} runs past the body's {len(body)} bytes")
    try:
        header = json.loads(body[4 : 4 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise BadRequest("the header must be a JSON object")
    shape, dtype, prompts = header.get("shape"), header.get("dtype"), header.get("prompts")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise BadRequest(f"header shape must be [B, C, H, W] of positive integers, got {shape!r}")
    if dtype not in DTYPES:
        raise BadRequest(f"header dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not (
        isinstance(prompts, list) and len(prompts) == shape[0] and all(isinstance(p, str) for p in prompts)
    ):
        raise BadRequest(f"header prompts must be a list of {shape[0]} strings (one per image)")
    metadata = header.get("metadata", [{} for _ in prompts])
    if not (
        isinstance(metadata, list)
        and len(metadata) == shape[0]
        and all(isinstance(m, dict) for m in metadata)
    ):
        raise BadRequest(f"header metadata must be a list of {shape[0]} objects (one per image)")
    data = body[4 + n :]
    expected = int(np.prod(shape)) * DTYPES[dtype].itemsize
    if len(data) != expected:
        raise BadRequest(f"{len(data)} image bytes for shape {shape} of {dtype}, which needs {expected}")
    images = np.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape).astype(np.float32)
    if dtype == "uint8":
        images /= 255.0
    return images, prompts, metadata


def _rows(value, n: int) -> np.ndarray | None:
    """An info value as float64 numbers: (n,) per image, or one number; None if not numbers."""
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape == (n,):
        return arr
    return np.asarray(arr.mean()) if arr.size else None


class _Job:
    def __init__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]):
        self.images, self.prompts, self.metadata = images, prompts, metadata
        self.rewards = np.zeros(len(prompts))
        self.info: dict[str, list] = {}  # key -> [(row, value, per_image)] over the scored rows
        self.error: str | None = None
        self.done = threading.Event()


class Batcher:
    """One thread scoring queued requests in batches of at most ``max_batch`` images of one size;
    it waits up to ``max_wait`` seconds after a request for others to join its batch."""

    def __init__(self, name: str, fn, max_batch: int, max_wait: float, device: str):
        self.name, self.fn, self.max_batch, self.max_wait, self.device = name, fn, max_batch, max_wait, device
        self.jobs: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # of every batch scored, for the curious (and the tests)
        threading.Thread(target=self._loop, name="flowrl-reward-server", daemon=True).start()

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> _Job:
        job = _Job(images, prompts, metadata)
        self.jobs.put(job)
        job.done.wait()
        return job

    def _loop(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            deadline = time.monotonic() + self.max_wait
            while sum(len(j.prompts) for j in jobs) < self.max_batch:
                try:
                    jobs.append(self.jobs.get(timeout=max(deadline - time.monotonic(), 0.0)))
                except queue.Empty:
                    break
            by_shape: dict[tuple, list[_Job]] = {}
            for job in jobs:
                by_shape.setdefault(job.images.shape[1:], []).append(job)
            try:
                for group in by_shape.values():
                    self._score_group(group)
            except Exception as e:  # a fault of the server itself: its requests still get an answer
                traceback.print_exc()
                for job in jobs:
                    job.error = job.error or f"the reward server failed: {type(e).__name__}: {e}"
            finally:
                for job in jobs:
                    job.done.set()

    def _score_group(self, jobs: list[_Job]) -> None:
        # the group's rows in order, as (job, row) pairs, cut into batches of max_batch
        rows = [(job, i) for job in jobs for i in range(len(job.prompts))]
        for start in range(0, len(rows), self.max_batch):
            part = rows[start : start + self.max_batch]
            live = [(j, i) for j, i in part if j.error is None]
            if not live:
                continue
            images = torch.from_numpy(np.stack([j.images[i] for j, i in live])).to(self.device)
            prompts = [j.prompts[i] for j, i in live]
            metadata = [j.metadata[i] for j, i in live]
            self.batch_sizes.append(len(live))
            try:
                values, info = self._call(images, prompts, metadata)
            except Exception as e:  # the reward's own error goes to every request of the batch
                traceback.print_exc()
                message = (
                    str(e)
                    if isinstance(e, RewardError)
                    else f"reward {self.name!r} raised {type(e).__name__}: {e}"
                )
                for j, _ in live:
                    j.error = message
                continue
            for r, (j, i) in enumerate(live):
                j.rewards[i] = values[r]
            for k, v in info.items():
                arr = _rows(v, len(live))
                for r, (j, i) in enumerate(live):
                    if arr is not None:
                        j.info.setdefault(k, []).append(
                            (i, arr[r] if arr.ndim else float(arr), arr.ndim == 1)
                        )

    def _call(self, images, prompts, metadata) -> tuple[np.ndarray, dict]:
        try:
            with torch.no_grad():
                out = self.fn(images, prompts, metadata)
        except (SystemExit, KeyboardInterrupt) as e:  # a reward's exit is an error of its batch
            raise RuntimeError(f"the reward called {type(e).__name__}({e})") from e
        values, info = validate_rewards(self.name, out, len(prompts), "cpu", allow_nonfinite=True)
        return values.double().numpy(), info


def response(job: _Job) -> dict:
    """The JSON answer for a scored request: its rewards and its info (see the module docstring)."""
    info: dict = {}
    for k, entries in job.info.items():
        if all(per_image for _, _, per_image in entries) and len(entries) == len(job.prompts):
            values = np.zeros(len(job.prompts))
            for i, v, _ in entries:
                values[i] = v
            info[k] = values.tolist()
        else:
            info[k] = float(np.mean([v for _, v, _ in entries]))
    return {"rewards": job.rewards.tolist(), "info": info}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardServer(ThreadingHTTPServer):
    """``flowrl serve-reward``'s server: the reward ``spec`` (a registered name or a script path,
    as a task file's ``rewards[].name``) built with ``kwargs`` on ``device``, served at
    ``host:port`` (port 0: a free one, see :attr:`url`). ``serve_forever()`` serves in the calling
    thread, :meth:`start` in a background one; :meth:`close` stops it."""

    daemon_threads = True

    def __init__(
        self,
        spec: str,
        kwargs: dict | None = None,
        host: str = "127.0.0.1",
        port: int = 8765,
        max_batch: int = 64,
        max_wait: float = 0.005,
        device: str = "cpu",
        max_request_mb: float = 1024.0,
    ):
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535] (0: a free one), got {port}")
        if max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {max_batch}; e.g. --max-batch 64")
        if not 0 <= max_wait < 60:
            raise ConfigError(f"--max-wait-ms must be in [0, 60000), got {max_wait * 1000:g}")
        if max_request_mb <= 0:
            raise ConfigError(f"--max-request-mb must be > 0, got {max_request_mb}")
        if spec == "remote":
            raise ConfigError("flowrl serve-reward serves a reward model; 'remote' is the client of a server")
        reward = Reward([{"name": spec, "kwargs": kwargs or {}}], device=device)  # errors name the reward
        name, _, fn = reward.terms[0]
        self.spec, self.differentiable = spec, resolve_reward(spec)[1]
        self.max_request_bytes = int(max_request_mb * 2**20)
        self.batcher = Batcher(name, fn, max_batch, max_wait, device)
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise ConfigError(
                f"flowrl serve-reward cannot listen on {host}:{port} ({e.strerror or e}); "
                "choose another --port (0 picks a free one) or --host"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict:
        return {
            "status": "ok",
            "protocol": PROTOCOL,
            "reward": self.spec,
            "differentiable": self.differentiable,
            "max_batch": self.batcher.max_batch,
        }

    def start(self) -> RewardServer:
        self._thread = threading.Thread(target=self.serve_forever, name="flowrl-reward-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout) first
            sys.stderr.write(f"flowrl serve-reward: {self.address_string()} left before its answer\n")

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._send(200, self.server.health())
        else:
            self._send(404, {"error": f"no {self.path}; GET /health or POST /score"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no {self.path}; POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._send(411, {"error": "a Content-Length header is required"})
            return
        if length > self.server.max_request_bytes:
            self._send(413, {"error": f"{length} bytes is over the server's --max-request-mb"})
            return
        try:
            images, prompts, metadata = decode_request(self.rfile.read(length))
        except BadRequest as e:
            self._send(400, {"error": f"malformed request: {e}"})
            return
        job = self.server.batcher.score(images, prompts, metadata)
        if job.error is not None:
            self._send(500, {"error": job.error})
        else:
            self._send(200, response(job))

    def log_request(self, code="-", size="-") -> None:  # failed requests only, not every one
        if str(getattr(code, "value", code)).startswith(("4", "5")):
            super().log_request(code, size)
