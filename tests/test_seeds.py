"""flowrl seeds: N training seeds of one task, aggregated (mean, 95% t interval) and plotted.

The runs are tiny (2 epochs of 2 envs x 4 chunks, episodes capped at 20 steps): the test checks
the bookkeeping, not learning. The interval is checked against scipy's t quantile and the
formula written out; the seeds run in subprocesses reproduce the in-process runs exactly.
"""

import json
import math

import numpy as np
import pytest
import torch

from flowrl.cli import main
from flowrl.errors import ConfigError
from flowrl.seeds import mean_interval, parse_seeds, t_quantile_975

TASK = "tasks/robot_inverted_pendulum_reinflow.yaml"
TINY = [
    "pretrain.steps=10",
    "pretrain.eval_episodes=0",
    "demos.num_episodes=2",
    "train.num_epochs=2",
    "train.eval_every=0",
    "train.update_epochs=1",
    "env.n_steps=4",
    "env.num_envs=2",
    "env.eval_episodes=2",
    "env.max_episode_steps=20",
    "train.minibatch_size=8",
]


@pytest.fixture
def keep_threads():
    """The runs set torch's thread count (train.torch_threads); the rest of the suite keeps its own."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_t_interval_matches_scipy_and_the_formula():
    from scipy import stats

    for df in [*range(1, 41), 60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    x = [1.0, 2.0, 4.0]
    m, ci = mean_interval(x)
    s = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert m == pytest.approx(7 / 3) and ci == pytest.approx(4.3027 * s / math.sqrt(3), rel=1e-4)
    assert mean_interval([5.0]) == (5.0, None)


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("a", "1,1", "", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def _summary(root):
    return json.loads((root / "robot_inverted_pendulum_reinflow_seeds" / "summary.json").read_text())


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """Seeds 0 and 1, one after another in this process, each with its own BC policy."""
    root = tmp_path_factory.mktemp("seeds")
    n = torch.get_num_threads()
    code = main(
        ["seeds", TASK, f"train.output_dir={root}", *TINY, "--seeds", "0,1", "--pretrain", "--parallel", "1"]
    )
    torch.set_num_threads(n)
    assert code == 0
    return root


def test_seeds_run_aggregate_and_plot(in_process, capsys, keep_threads):
    root = in_process / "robot_inverted_pendulum_reinflow_seeds"
    s = _summary(in_process)
    assert s["seeds"] == [0, 1] and s["failed_seeds"] == []
    finals, starts = [], []
    for seed in (0, 1):
        rows = [json.loads(x) for x in (root / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        finals.append(rows[-1]["eval_return_mean"])
        starts.append(rows[0]["eval_return_mean"])
        seconds = sum(r.get("time_collect", 0) + r.get("time_update", 0) for r in rows)
        assert s["per_seed"][str(seed)]["seconds"] == pytest.approx(seconds)
        assert s["per_seed"][str(seed)]["steps"] == rows[-1]["env_steps"]
        assert (root / f"seed_{seed}_bc" / "policy.json").is_file()  # epoch 0 is the seed's own BC policy
    assert s["final_mean"] == pytest.approx(np.mean(finals))
    assert s["final_ci95"] == pytest.approx(12.7062 * np.std(finals, ddof=1) / math.sqrt(2))
    assert s["start_mean"] == pytest.approx(np.mean(starts)) and s["expert_return"] > 0
    assert [p["epoch"] for p in s["curve"]] == [0, 2] and 0 <= s["success_mean"] <= 1
    assert (root / "curves.png").stat().st_size > 0
    md = (root / "summary.md").read_text()
    assert "| seeds | final return | success rate |" in md and "BC policy (epoch 0)" in md
    # a second call reads the finished seeds instead of re-running them
    assert main(["seeds", TASK, f"train.output_dir={in_process}", *TINY, "--seeds", "0,1", "--pretrain"]) == 0
    assert (
        "finished before" in capsys.readouterr().out and _summary(in_process)["final_mean"] == s["final_mean"]
    )


@pytest.mark.slow
def test_parallel_seeds_in_subprocesses_repeat_the_in_process_runs(in_process, tmp_path, keep_threads):
    """--parallel 2: each seed a process with its own folder and log; the same numbers as the
    in-process runs (one torch thread each either way: the env tasks' train.torch_threads)."""
    assert (
        main(
            [
                "seeds",
                TASK,
                f"train.output_dir={tmp_path}",
                *TINY,
                "--seeds",
                "0,1",
                "--pretrain",
                "--parallel",
                "2",
            ]
        )
        == 0
    )
    a, b = _summary(in_process), _summary(tmp_path)
    assert a["per_seed"].keys() == b["per_seed"].keys() == {"0", "1"}
    for seed in a["per_seed"]:
        assert a["per_seed"][seed]["final"] == b["per_seed"][seed]["final"]
        assert a["per_seed"][seed]["steps"] == b["per_seed"][seed]["steps"]
    assert (tmp_path / "robot_inverted_pendulum_reinflow_seeds" / "seed_1.log").is_file()


def test_text_to_image_seeds_aggregate_the_evaluation_reward(tmp_path):
    """A text-to-image task's seeds: the final evaluation reward, against samples and seconds."""
    from flowrl.config import load_config
    from flowrl.seeds import summarize

    cfg = load_config("digits", [])
    for seed, rewards in ((0, [0.5, 0.7]), (1, [0.5, 0.9])):
        folder = tmp_path / f"seed_{seed}"
        folder.mkdir()
        rows = [
            {"epoch": 0, "eval_reward_mean": rewards[0]},
            {"epoch": 1, "samples": 16, "time_collect": 1.0, "time_update": 2.0},
            {
                "epoch": 2,
                "samples": 16,
                "time_collect": 1.0,
                "time_update": 2.0,
                "eval_reward_mean": rewards[1],
            },
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path, [0, 1], cfg, "digits")
    assert s["metric"] == "eval_reward_mean" and s["final_mean"] == pytest.approx(0.8)
    assert s["final_ci95"] == pytest.approx(12.7062 * np.std([0.7, 0.9], ddof=1) / math.sqrt(2))
    assert s["start_mean"] == 0.5 and "success_mean" not in s and "expert_return" not in s
    assert [(p["steps"], p["seconds"]) for p in s["curve"]] == [(0, 0), (32, 6.0)]
