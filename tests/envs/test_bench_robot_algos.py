"""bench/bench_robot_algos.py (issue 17): every method's run resolves to a valid config of that method
on the comparison's environments, the flow methods share one BC policy, and the aggregate's numbers
are the per-seed ones' means (no training here; the benchmark itself is run by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_robot_algos", REPO / "bench" / "bench_robot_algos.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAMILY = {"dppo": "diffusion_policy", "dppo_ddim": "diffusion_policy", "gaussian_ppo": "gaussian_policy"}
FAMILY.update(residual_ppo="residual_policy", dsrl_ppo="dsrl_policy", dsrl_sac="dsrl_policy")
SAMPLER = {"dppo": "ddpm", "dppo_ddim": "ddim", "pirl_flow_sde": "flow_sde", "pirl_flow_noise": "flow_noise"}
SAMPLER.update(
    fpo="euler", **{"fpo++": "euler"}, gaussian_ppo="gaussian", residual_ppo="gaussian", dsrl_ppo="gaussian"
)
SAMPLER.update(dsrl_sac="gaussian")


@pytest.mark.parametrize("env_id", ["InvertedDoublePendulum-v5", "Reacher-v5"])
def test_every_method_resolves_on_the_env(bench, env_id):
    tasks = bench.find_tasks(env_id, list(bench.ORDER), None)
    assert list(tasks) == list(bench.ORDER)
    keys = {}
    for method, (task, overrides) in tasks.items():
        cfg = bench._load(task, overrides)
        assert cfg.env.id == env_id
        assert cfg.algorithm.name == bench.METHODS[method][0]
        assert cfg.model.family == FAMILY.get(method, "flow_policy"), method
        assert (cfg.sampler.name or "reinflow") == SAMPLER.get(method, "reinflow"), method
        keys[method] = bench.bc_key(cfg)
    # ReinFlow, pi-RL, FPO and the heads on the flow policy clone one and the same flow policy
    flow = {m for m in bench.ORDER if m not in ("dppo", "dppo_ddim", "gaussian_ppo", "reinflow_shortcut")}
    assert len({keys[m] for m in flow}) == 1
    assert keys["reinflow_shortcut"] != keys["reinflow"]  # the shortcut policy clones on its own
    assert keys["dppo"] == keys["dppo_ddim"] != keys["reinflow"]
    assert len({keys["dppo"], keys["gaussian_ppo"], keys["reinflow"]}) == 3


def test_own_task_files_are_preferred(bench):
    tasks = bench.find_tasks("Reacher-v5", ["dppo", "reinflow", "gaussian_ppo", "fpo", "fpo++"], None)
    assert tasks["dppo"] == ("robot_reacher_dppo", [])
    assert tasks["gaussian_ppo"] == ("robot_reacher_gaussian", [])
    assert tasks["fpo"] == ("robot_reacher_fpo", [])  # Reacher's own FPO settings
    assert tasks["fpo++"][0] == "robot_reacher_reinflow" and "algorithm.name=fpo++" in tasks["fpo++"][1]
    # on the pendulum DPPO's DDIM has its own file, and DDPM DPPO does not take it
    ip = bench.find_tasks("InvertedPendulum-v5", ["dppo", "dppo_ddim"], None)
    assert ip == {
        "dppo": ("robot_inverted_pendulum_dppo", []),
        "dppo_ddim": ("robot_inverted_pendulum_dppo_ddim", []),
    }


def test_aggregate_by_hand(bench):
    def run(method, seed, final, hit_steps, hit_s):
        curve = [{"iteration": 0, "env_steps": 0, "train_seconds": 0.0, "eval_return_mean": 1.0}]
        curve.append(
            {"iteration": 1, "env_steps": hit_steps, "train_seconds": hit_s, "eval_return_mean": final}
        )
        r = {"method": method, "task": "t", "derived": False, "seed": seed, "sampler": "s", "iterations": 1}
        r.update(bc_return=1.0, final_return=final, best_return=final, train_seconds=hit_s, curve=curve)
        r["reached"] = bench.first_reach(curve, 10.0)
        return r

    results = {
        "dppo": [run("dppo", 0, 12.0, 100, 4.0), run("dppo", 1, 14.0, 300, 8.0)],
        "reinflow": [run("reinflow", 0, 11.0, 50, 1.0), run("reinflow", 1, 5.0, 70, 2.0)],
    }
    assert results["reinflow"][1]["reached"] is None
    rows = bench.aggregate_table(results, 10.0).splitlines()
    dppo, reinflow = rows[2].split(" | "), rows[3].split(" | ")
    assert dppo[4] == "13.0 ± 12.7"  # mean 13, t(1) 12.706 x std 1.414 / sqrt 2
    assert dppo[5:8] == ["2/2", "200 ± 1271", "6.0 ± 25.4"]
    assert reinflow[5:9] == ["1/2", "50", "1.0", "0.17"]  # 1.0 s / DPPO's mean 6.0 s


def test_paired_ratios_and_bounds_by_hand(bench):
    def run(method, seed, hit_s, total_s, iterations=2):
        curve = [{"iteration": 0, "env_steps": 0, "train_seconds": 0.0, "eval_return_mean": 1.0}]
        curve.append(
            {"iteration": iterations, "env_steps": 100, "train_seconds": total_s, "eval_return_mean": 5.0}
        )
        hit = None if hit_s is None else {"env_steps": 100, "train_seconds": hit_s}
        return {
            "method": method,
            "seed": seed,
            "iterations": iterations,
            "train_seconds": total_s,
            "reached": hit,
        }

    results = {
        "dppo": [run("dppo", 0, 10.0, 20.0), run("dppo", 1, 5.0, 20.0), run("dppo", 2, None, 40.0)],
        "reinflow": [
            run("reinflow", 0, 2.0, 4.0),
            run("reinflow", 1, 2.0, 4.0),
            run("reinflow", 2, 4.0, 8.0),
        ],
    }
    row = bench.paired_table(results, 9.0).splitlines()[2].split(" | ")
    # seeds 0, 1: 2/10 and 2/5; seed 2: DPPO never reached it, so its time exceeds its 40 s: < 4/40
    assert row[2] == "0: 0.20, 1: 0.40, 2: < 0.10"
    assert row[3] == "0.30 ± 1.27 (2 seeds)"  # mean 0.3, t(1) 12.706 x std 0.1414 / sqrt 2
    assert row[4] == "0.20 ± 0.00"  # per iteration 2/10, 2/10, 4/20


def test_report_only_cuts_longer_runs_at_the_budget(bench, tmp_path):
    import json

    work = tmp_path / "seed_0"
    (work / "reinflow").mkdir(parents=True)
    rows = [{"epoch": 0, "env_steps": 0, "eval_return_mean": 1.0, "eval_return_std": 0.0}]
    for e in (1, 2, 3):
        rows.append(
            {"epoch": e, "env_steps": 10 * e, "time_collect": 1.0, "time_update": 0.5}
            | {"eval_return_mean": float(e), "eval_return_std": 0.0}
        )
    (work / "reinflow" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (work / "reinflow.result.json").write_text(json.dumps({"iterations": 3, "final_return": 3.0}))
    task, overrides = "robot_reacher_reinflow", ["train.num_epochs=2"]
    assert bench.finished_result("reinflow", task, overrides, str(work), 3)["final_return"] == 3.0
    cut = bench.finished_result("reinflow", task, overrides, str(work), 2)
    assert (cut["iterations"], cut["final_return"], cut["env_steps"]) == (2, 2.0, 20)
    assert cut["train_seconds"] == 3.0 and bench.iterations_run([cut]) == "2"
