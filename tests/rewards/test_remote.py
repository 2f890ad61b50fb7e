"""The reward server (``flowrl serve-reward``) and its client (the ``remote`` reward), on loopback
with the digits classifier (``digit_alignment``): the wire format and its refusals, batching of
concurrent requests, the client's errors, a short ``flowrl train`` whose metrics equal the local
reward's, a server that dies mid-run (exit code 2, one line, the last checkpoint resumes to the
uninterrupted run) and a slow one (scoring overlaps sampling); and a reward's info dict reaching
metrics.jsonl and TensorBoard as numbers."""

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.checkpoint import latest_checkpoint
from flowrl.cli import main as cli_main
from flowrl.config import ConfigError, load_config
from flowrl.rewards import Reward, RewardError
from flowrl.rewards.registry import mean_info
from flowrl.rewards.server import BadRequest, RewardServer, decode_request, encode_request, is_loopback
from flowrl.run import Run

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "tasks/digits.yaml")
PROMPTS = [f"a handwritten digit {d}" for d in range(10)]
# a short digits run: the evaluation before training, 2 epochs of one batch, a checkpoint after each
SHORT = [
    "train.num_epochs=2",
    "train.sample_batch_size=8",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=8",
    "sampler.num_steps=6",
    "train.eval_every=0",
    "train.save_every=1",
]

# a reward whose value is the image mean plus the prompt's metadata "bias", with per-image,
# scalar and non-numeric info: exact whatever the batch it is scored in
MEAN_SCRIPT = """
def reward_fn(images, prompts, metadata):
    values = images.mean(dim=(1, 2, 3)) + images.new_tensor([m.get("bias", 0.0) for m in metadata])
    return values, {"peak": images.amax(dim=(1, 2, 3)), "count": len(prompts), "ratio": [0.25, 0.75], "tag": "x"}
"""
# digit_alignment that dies (the whole server process, as a crash or an OOM kill does) on call die_after + 1
DYING_SCRIPT = """
import os
from flowrl.demo.rewards import digit_alignment

def make_reward(die_after, device="cpu"):
    fn, calls = digit_alignment(device), [0]

    def reward_fn(images, prompts, metadata):
        calls[0] += 1
        if calls[0] > die_after:
            os._exit(3)
        return fn(images, prompts, metadata)

    return reward_fn
"""
# digit_alignment after a sleep, appending each call's (start, end) to a file
SLOW_SCRIPT = """
import time
from flowrl.demo.rewards import digit_alignment

def make_reward(sleep, log, device="cpu"):
    fn = digit_alignment(device)

    def reward_fn(images, prompts, metadata):
        start = time.monotonic()
        time.sleep(sleep)
        out = fn(images, prompts, metadata)
        with open(log, "a") as f:
            f.write(f"{start} {time.monotonic()}\\n")
        return out

    return reward_fn
"""


def _script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _remote(url: str, **kwargs) -> str:
    options = ", ".join(f"{k}: {v}" for k, v in {"url": f'"{url}"', **kwargs}.items())
    return f"rewards=[{{name: remote, kwargs: {{{options}}}}}]"


def _rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings, the reward's name made neutral (local digit_alignment or remote)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            k.replace("digit_alignment", "R").replace("remote", "R"): v
            for k, v in r.items()
            if not k.startswith(("time_", "samples_per_s"))
        }
        for r in rows
    ]


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    """The short digits run with the local digit_alignment reward (and TensorBoard)."""
    out = tmp_path_factory.mktemp("local")
    flags = [*SHORT, f"train.output_dir={out}", "train.run_name=run", "train.log_with=tensorboard"]
    assert cli_main(["train", DIGITS, *flags]) == 0
    return out / "run"


@pytest.fixture(scope="module")
def local_rows(local_dir):
    return _rows(local_dir)


# ---------------------------------------------------------------------- wire format, batching


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_request_roundtrip(dtype):
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    if dtype == "uint8":
        sent = (x * 255).round().astype(np.uint8)
        expected = sent.astype(np.float32) / 255
    else:
        sent = x.astype(dtype)
        expected = sent.astype(np.float32)
    images, prompts, metadata = decode_request(encode_request(sent, ["a", "b", "c"], [{"k": 1}, {}, {}]))
    assert images.dtype == np.float32 and np.array_equal(images, expected)
    assert prompts == ["a", "b", "c"] and metadata == [{"k": 1}, {}, {}]


def _body(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack(">I", len(text)) + text + data


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x00", "shorter than"),
        (struct.pack(">I", 99) + b"{}", "runs past"),
        (struct.pack(">I", 3) + b"{x}", "not UTF-8 JSON"),
        (_body({"shape": [1, 1, 2], "dtype": "uint8", "prompts": ["a"]}, b"\x00" * 2), "shape must be"),
        (_body({"shape": [1, 1, 1, 2], "dtype": "object", "prompts": ["a"]}, b"\x00" * 2), "dtype must be"),
        (_body({"shape": [2, 1, 1, 2], "dtype": "uint8", "prompts": ["a"]}, b"\x00" * 4), "2 strings"),
        (
            _body({"shape": [1, 1, 1, 2], "dtype": "uint8", "prompts": ["a"], "metadata": [1]}, b"\x00" * 2),
            "objects",
        ),
        (_body({"shape": [1, 1, 1, 2], "dtype": "float32", "prompts": ["a"]}, b"\x00" * 2), "needs 8"),
    ],
)
def test_malformed_requests_are_refused(body, message):
    with pytest.raises(BadRequest, match=message):
        decode_request(body)


def test_concurrent_requests_are_batched_and_answered_per_request(tmp_path):
    script = _script(tmp_path, "mean.py", MEAN_SCRIPT)
    rng = np.random.default_rng(0)
    requests = [rng.random((n, 3, 4, 4), dtype=np.float32) for n in (3, 3, 3, 3, 10)]
    with RewardServer(script, port=0, max_batch=8, max_wait=0.3) as server:
        reward = Reward([{"name": "remote", "kwargs": {"url": server.url}}])
        answers: dict[int, tuple] = {}

        def send(i):
            meta = [{"bias": float(i)} for _ in requests[i]]
            answers[i] = reward(torch.from_numpy(requests[i]), ["p"] * len(requests[i]), meta)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = server.batcher.batch_sizes
    # 22 images in batches of at most 8; concurrent requests share batches, the 10 is split
    assert sum(sizes) == 22 and max(sizes) == 8 and len(sizes) < len(requests) + 1
    for i, x in enumerate(requests):
        rewards, info = answers[i]
        expected = torch.from_numpy(x).mean(dim=(1, 2, 3)) + i  # the request's own metadata
        torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            info["reward_info/remote/peak"].float(), torch.from_numpy(x).amax(dim=(1, 2, 3))
        )
        assert info["reward_info/remote/ratio"] == 0.5  # a list reduced to its mean
        assert "reward_info/remote/tag" not in info  # not a number
    # count is per scored batch (len(prompts) there): the request's mean over its rows' batches
    assert 3 <= answers[0][1]["reward_info/remote/count"] <= 8


def test_server_health_and_loopback(tmp_path):
    import urllib.request

    with RewardServer("digit_alignment", port=0) as server:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
            health = json.loads(r.read())
    assert health == {
        "status": "ok",
        "protocol": 1,
        "reward": "digit_alignment",
        "differentiable": True,
        "max_batch": 64,
    }
    assert server.url.startswith("http://127.0.0.1:")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("")


def test_remote_equals_local_reward_and_info():
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    local_r, local_info = Reward([{"name": "digit_alignment"}])(x, PROMPTS)
    with RewardServer("digit_alignment", port=0) as server:
        remote_r, remote_info = Reward([{"name": "remote", "kwargs": {"url": server.url}}])(x, PROMPTS)
        half_r, _ = Reward([{"name": "remote", "kwargs": {"url": server.url, "encoding": "float16"}}])(
            x, PROMPTS
        )
    # float32 images travel exactly (the wire round trip is tested bit for bit above); the server's
    # thread may reduce in another order, so the scores agree to float32 rounding, not bitwise
    torch.testing.assert_close(remote_r, local_r, rtol=1e-5, atol=1e-12)
    assert remote_info["reward_info/remote/accuracy"] == pytest.approx(
        local_info["reward_info/digit_alignment/accuracy"].item()
    )
    assert not torch.equal(half_r, local_r)
    torch.testing.assert_close(half_r, local_r, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------- the client's errors


def test_client_errors_name_the_url(tmp_path):
    with RewardServer("digit_alignment", port=0) as server:
        url = server.url
    # nothing listens there any more: the factory's health check fails after its retries
    t0 = time.monotonic()
    with pytest.raises(
        RewardError, match=rf"reward server at {url} did not answer \(ConnectionRefusedError.*3 attempts"
    ):
        Reward([{"name": "remote", "kwargs": {"url": url, "retries": 2, "backoff": 0.05}}])
    assert time.monotonic() - t0 >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s

    bad = _script(
        tmp_path, "bad.py", "def reward_fn(images, prompts, metadata):\n    raise ValueError('no eyes')\n"
    )
    slow = _script(
        tmp_path,
        "slow.py",
        "import time\ndef reward_fn(images, prompts, metadata):\n    time.sleep(0.6)\n    return images.mean(dim=(1, 2, 3)), {}\n",
    )
    x = torch.rand(2, 1, 8, 8)
    with RewardServer(bad, port=0) as server:  # the reward raises: HTTP 500, not retried
        reward = Reward([{"name": "remote", "kwargs": {"url": server.url, "retries": 3, "backoff": 5}}])
        with pytest.raises(
            RewardError,
            match=r"refused the request \(HTTP 500\): reward '.*bad.py' raised ValueError: no eyes",
        ):
            reward(x, ["a", "b"])
    shape = _script(tmp_path, "shape.py", "def reward_fn(images, prompts, metadata):\n    return [1.0], {}\n")
    with RewardServer(shape, port=0) as server:  # a reward's wrong output: checked on the server
        reward = Reward([{"name": "remote", "kwargs": {"url": server.url}}])
        with pytest.raises(
            RewardError, match=r"\(HTTP 500\): reward '.*shape.py' returned shape \(1,\) for a batch of 2"
        ):
            reward(x, ["a", "b"])
    with RewardServer(slow, port=0) as server:
        reward = Reward([{"name": "remote", "kwargs": {"url": server.url, "timeout": 0.2, "retries": 0}}])
        with pytest.raises(
            RewardError, match=rf"{server.url} did not answer \(no answer within timeout=0.2 s; 1 attempt\)"
        ):
            reward(x, ["a", "b"])
    for kwargs, message in [
        ({}, "needs kwargs.url"),
        ({"url": "ftp://x"}, "needs kwargs.url"),
        ({"url": "http://x", "timeout": 0}, "kwargs.timeout"),
        ({"url": "http://x", "retries": -1}, "kwargs.retries"),
        ({"url": "http://x", "encoding": "png"}, "kwargs.encoding"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Reward([{"name": "remote", "kwargs": kwargs}])
    with pytest.raises(ConfigError, match="'remote' is the client"):
        RewardServer("remote", port=0)


def _lines(text: str) -> list[str]:
    """flowrl's own lines (not an earlier test's server threads' notes, which may arrive late)."""
    return [line for line in text.splitlines() if not line.startswith("flowrl serve-reward:")]


def test_cli_serve_reward_warns_off_loopback_and_refuses_bad_options(monkeypatch, capsys):
    monkeypatch.setattr(RewardServer, "serve_forever", lambda self: None)  # return at once
    capsys.readouterr()
    assert cli_main(["serve-reward", "digit_alignment", "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "serving reward 'digit_alignment'" in out and " at http://0.0.0.0:" in out
    (warning,) = _lines(err)
    assert warning.startswith("flowrl: warning: --host 0.0.0.0 serves the reward beyond this machine")
    assert cli_main(["serve-reward", "digit_alignment", "--port", "0"]) == 0
    assert _lines(capsys.readouterr().err) == []  # loopback: no warning
    for args, message in [
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--kwargs", "[1]"], "--reward-kwargs must be a JSON object"),
        (["--kwargs", '{"colour": 1}'], "reward 'digit_alignment': its options"),
        ([], "unknown reward 'no_such_reward'"),
    ]:
        spec = "no_such_reward" if not args else "digit_alignment"
        assert cli_main(["serve-reward", spec, *args]) == 2
        (line,) = _lines(capsys.readouterr().err)
        assert line.startswith("flowrl: error: ") and message in line, line


# ---------------------------------------------------------------------- flowrl train with a remote reward


def test_train_with_the_remote_reward_equals_the_local_one(tmp_path, local_rows):
    with RewardServer("digit_alignment", port=0) as server:
        rc = cli_main(
            [
                "train",
                DIGITS,
                *SHORT,
                f"train.output_dir={tmp_path}",
                "train.run_name=run",
                _remote(server.url),
            ]
        )
    assert rc == 0
    rows = _rows(tmp_path / "run")
    assert rows == local_rows  # rewards, info, losses, evaluation: the same run
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert 0 < rows[1]["reward_info/R/accuracy"] <= 1 and "eval_reward_info/R/accuracy" in rows[2]


def _serve(spec: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``flowrl serve-reward`` in a subprocess; (process, url) once it listens."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowrl.cli", "serve-reward", spec, "--device", "cpu", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # "flowrl: serving reward ... at http://127.0.0.1:PORT (Ctrl-C stops)"
    assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
    return proc, line.split(" at ")[1].split()[0]


def test_server_dying_mid_run_stops_with_one_line_and_resumes(tmp_path, local_rows, capsys):
    script = _script(tmp_path, "dying.py", DYING_SCRIPT)
    # calls: the evaluation before training, epoch 1's batch (checkpoint 1), then it dies in epoch 2
    proc, url = _serve(script, "--port", "0", "--kwargs", '{"die_after": 2}')
    flags = [
        *SHORT,
        f"train.output_dir={tmp_path}",
        "train.run_name=run",
        _remote(url, retries=1, backoff=0.05),
    ]
    try:
        capsys.readouterr()
        rc = cli_main(["train", DIGITS, *flags])
        err = capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == 3  # the server died, as it was made to
    assert rc == 2
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"flowrl: error: the reward server at {url} did not answer"
    )
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "epoch_000001"  # the last saved checkpoint is intact
    # the server is back (in this process, on the same port): the run resumes and ends as the
    # uninterrupted local run did
    port = int(url.rsplit(":", 1)[1])
    with RewardServer("digit_alignment", port=port):
        assert cli_main(["train", DIGITS, *flags, "train.resume=auto"]) == 0
    assert _rows(run) == local_rows


def test_slow_server_scores_while_the_next_batch_samples(tmp_path):
    log = tmp_path / "scoring.txt"
    script = _script(tmp_path, "slow.py", SLOW_SCRIPT)
    with RewardServer(script, {"sleep": 0.3, "log": str(log)}, port=0) as server:
        cfg = load_config(
            DIGITS,
            [
                *SHORT,
                "train.num_epochs=1",
                "train.num_batches_per_epoch=3",
                "train.sample_batch_size=16",
                "train.save_every=0",
                "train.async_reward=true",
                f"train.output_dir={tmp_path}",
                _remote(server.url),
            ],
        )
        run = Run(cfg, "slow", progress=False)
        sampling: list[tuple[float, float]] = []
        sample = run.sampler.sample

        def timed(*args, **kwargs):
            start = time.monotonic()
            out = sample(*args, **kwargs)
            sampling.append((start, time.monotonic()))
            return out

        run.sampler.sample = timed
        history = run.train()
    scoring = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    t0, t1 = sampling[0][0], sampling[-1][1] + 10
    scoring = [s for s in scoring if t0 <= s[0] <= t1][:3]  # the epoch's 3 batches (not the evaluations)
    assert len(sampling) == 3 and len(scoring) == 3
    # batch i + 1 starts sampling before batch i's scoring ends (scored in turn, without
    # train.async_reward it would start only once the server had answered)
    for (_, s1), (m0, _) in zip(scoring[:2], sampling[1:]):
        assert m0 < s1, (scoring, sampling)
    # so the epoch's collection takes less than its sampling and scoring one after the other (by
    # about 2 x min(sampling, scoring of a batch))
    serial = sum(b - a for a, b in sampling) + sum(b - a for a, b in scoring)
    assert history[1]["time_collect"] < serial


# ---------------------------------------------------------------------- a reward's info in the metrics


def test_reward_info_as_numbers(tmp_path):
    script = _script(tmp_path, "mean.py", MEAN_SCRIPT)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    _, info = Reward([{"name": script}])(x, ["a"] * 4)
    assert {k for k in info if k.startswith("reward_info/")} == {
        f"reward_info/mean/{k}" for k in ("peak", "count", "ratio", "tag")
    }
    second = {
        "reward_info/mean/count": 2,
        "reward_info/mean/peak": torch.tensor([0.5]),
        "reward/mean": torch.ones(2),
    }
    numbers = mean_info([info, second])
    assert numbers == {
        "reward_info/mean/peak": pytest.approx(
            (x.amax(dim=(1, 2, 3)).mean().item() + 0.5) / 2
        ),  # tensors: their mean
        "reward_info/mean/count": 3.0,  # (4 + 2) / 2 over the two batches
        "reward_info/mean/ratio": 0.5,  # a list: its mean (the one batch that has it)
    }  # the string is not a number: left out; reward/* are the terms, logged as before


def test_reward_info_reaches_metrics_and_tensorboard(local_rows, local_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # digit_alignment's info: the classifier's accuracy on each batch (a 0-d tensor)
    for row in local_rows[1:]:
        assert 0 < row["reward_info/R/accuracy"] <= 1
    assert "eval_reward_info/R/accuracy" in local_rows[0] and "eval_reward_info/R/accuracy" in local_rows[2]
    events = EventAccumulator(str(next((local_dir / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = events.Scalars("reward_info/digit_alignment/accuracy")
    assert [e.value for e in logged] == pytest.approx([r["reward_info/R/accuracy"] for r in local_rows[1:]])
    assert "eval_reward_info/digit_alignment/accuracy" in events.Tags()["scalars"]
