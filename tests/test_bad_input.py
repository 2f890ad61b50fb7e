"""Bad input stops with one clear error naming the cause and the fix, before any expensive work,
and leaves no checkpoint behind. Each case matches a substring of the cause and one of the fix."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.cli import main as cli_main
from flowrl.config import ConfigError, load_config
from flowrl.rewards import Reward, RewardError

REPO = Path(__file__).resolve().parents[1]
TASK = str(REPO / "tasks/jpeg_tiny.yaml")
ROBOT_TASK = str(REPO / "tasks/robot_inverted_pendulum_reinflow.yaml")

# (overrides, cause, fix): rejected by load_config, before any model, env or file is touched
CONFIG_CASES = {
    "misspelled-key": (
        ["train.num_epoch=3"],
        "unknown config key 'train.num_epoch'",
        "did you mean 'num_epochs'",
    ),
    "misspelled-section": (
        ["optimizer.learning_rate=1e-3"],
        "unknown config key 'optimizer'",
        "did you mean 'optim'",
    ),
    "misspelled-sampler-key": (
        ["sampler.num_step=3"],
        "unknown config key 'sampler.num_step'",
        "did you mean 'num_steps'",
    ),
    "int-gets-text": (
        ["train.num_epochs=many"],
        "train.num_epochs: expected int, got 'many'",
        "train.num_epochs=4",
    ),
    "int-gets-float": (["train.sample_batch_size=4.5"], "expected int, got 4.5", "train.sample_batch_size=4"),
    "float-gets-text": (
        ["optim.learning_rate=fast"],
        "expected float, got 'fast'",
        "optim.learning_rate=0.001",
    ),
    "bool-gets-text": (["train.ema=maybe"], "train.ema: expected bool", "train.ema=true"),
    "str-gets-number": (
        ["model.pretrained=123"],
        "model.pretrained: expected str or null, got 123",
        "quote it",
    ),
    "optional-gets-text": (
        ["sampler.eval_num_steps=few"],
        "expected int or null",
        "sampler.eval_num_steps=4",
    ),
    "section-gets-scalar": (["model=tiny"], "model: expected a section", "model.pretrained=..."),
    "rewards-not-a-list": (
        ["rewards=jpeg_compressibility"],
        "expected a list of rewards",
        "rewards=[{name: jpeg_compressibility}]",
    ),
    "rewards-empty": (["rewards=[]"], "the list is empty", "rewards=[{name: jpeg_compressibility}]"),
    "reward-weight-nan": (["rewards.0.weight=.nan"], "must be a finite number", "rewards.0.weight=1.0"),
    "mixed-precision-yes": (["train.mixed_precision=yes"], "got the boolean True", "no, fp16, bf16"),
    "mixed-precision-fp8": (["train.mixed_precision=fp8"], "unknown precision 'fp8'", "set no, fp16 or bf16"),
    "log-with-unknown": (["train.log_with=mlflow"], "unknown tracker 'mlflow'", "tensorboard or wandb"),
    "unknown-algorithm": (["algorithm.name=ppo"], "unknown algorithm 'ppo'", "choose one of"),
    "misspelled-algorithm": (["algorithm.name=grp"], "unknown algorithm 'grp'", "did you mean 'grpo'"),
    "unknown-sampler": (["sampler.name=flow_sdee"], "unknown sampler 'flow_sdee'", "did you mean 'flow_sde'"),
    "unknown-family": (["model.family=sd4"], "unknown family 'sd4'", "did you mean 'sd'"),
    "unknown-finetune": (["model.finetune=partial"], "unknown mode 'partial'", "model.finetune=full"),
    "lora-rank-0": (
        ["model.finetune=lora", "model.lora_rank=0"],
        "lora_rank must be >= 1, got 0",
        "model.lora_rank=4",
    ),
    "lora-alpha-negative": (["model.lora_alpha=-1"], "lora_alpha must be > 0", "model.lora_alpha=null"),
    "negative-lr": (
        ["optim.learning_rate=-1e-4"],
        "learning_rate must be > 0, got -0.0001",
        "optim.learning_rate=3e-4",
    ),
    "zero-grad-norm": (["optim.max_grad_norm=0"], "max_grad_norm must be > 0", "optim.max_grad_norm=1.0"),
    "beta-out-of-range": (["optim.beta2=1.5"], "beta2 must be in [0, 1)", "0.999"),
    "grad-accum-0": (
        ["optim.gradient_accumulation_steps=0"],
        "must be >= 1, got 0",
        "set 1 for one optimizer step",
    ),
    "batch-not-multiple-of-group": (
        ["algorithm.name=grpo", "algorithm.group_size=3", "train.sample_batch_size=16"],
        "(16) must be divisible by algorithm.group_size (3)",
        "multiple of 3",
    ),
    "train-batch-not-divisor": (
        ["train.minibatch_size=5"],
        "must divide the samples per epoch",
        "a divisor of 32",
    ),
    "grpo-group-1": (
        ["algorithm.name=grpo", "algorithm.group_size=1"],
        "group_size must be >= 2 for grpo",
        "algorithm.group_size=4",
    ),
    "num-steps-0": (["sampler.num_steps=0"], "num_steps must be >= 1, got 0", "sampler.num_steps=20"),
    "eta-0": (["sampler.eta=0"], "eta must be > 0 for training", "sampler.eta=1.0"),
    "eta-negative": (["sampler.eta=-0.5"], "eta must be > 0 for training, got -0.5", "sampler.eta=1.0"),
    "noise-level-0": (
        ["sampler.noise_level=0"],
        "noise_level must be > 0 or null",
        "sampler.noise_level=null",
    ),
    "sde-window-too-long": (
        ["sampler.sde_window=50"],
        "sde_window must be in [0, sampler.num_steps=10]",
        "set 0 for every step",
    ),
    "guidance-below-1": (
        ["sampler.guidance_scale=0.5"],
        "guidance_scale must be >= 1",
        "sampler.guidance_scale=1",
    ),
    "clip-range-0": (
        ["algorithm.clip_range=0"],
        "clip_range must be > 0 or null, got 0",
        "algorithm.clip_range=1e-4",
    ),
    "clip-range-negative": (
        ["algorithm.clip_range=-0.2"],
        "clip_range must be > 0 or null",
        "null for no clipping",
    ),
    "adv-clip-0": (["algorithm.adv_clip_max=0"], "adv_clip_max must be > 0", "algorithm.adv_clip_max=5"),
    "timestep-fraction-0": (
        ["algorithm.timestep_fraction=0"],
        "timestep_fraction must be in (0, 1]",
        "set 1.0",
    ),
    "kl-negative": (["algorithm.kl_coef=-0.1"], "kl_coef must be >= 0", "0.04"),
    "logprob-reduction": (
        ["sampler.logprob_reduction=max"],
        "unknown reduction 'max'",
        "sampler.logprob_reduction=mean",
    ),
    "std-scope": (["algorithm.std_scope=global"], "unknown scope 'global'", "group, batch or none"),
    "num-epochs-0": (["train.num_epochs=0"], "train.num_epochs must be >= 1, got 0", "train.num_epochs=4"),
    "save-every-negative": (["train.save_every=-1"], "train.save_every must be >= 0", "set 0 to turn it off"),
    "ema-decay-1": (["train.ema_decay=1.0"], "ema_decay must be in (0, 1)", "train.ema_decay=0.99"),
    "override-not-key-value": (["train.num_epochs"], "is not key=value", "e.g. train.num_epochs=5"),
    "override-bad-index": (
        ["rewards.3.weight=2"],
        "'3' is not an index of a 1-item list",
        "rewards.0.weight=...",
    ),
    "override-into-a-value": (
        ["train.num_epochs.x=1"],
        "'num_epochs' is not a section",
        "set train.num_epochs itself",
    ),
}


@pytest.mark.parametrize("overrides, cause, fix", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_is_rejected_at_load(overrides, cause, fix):
    with pytest.raises(ConfigError) as err:
        load_config(TASK, overrides)
    msg = str(err.value)
    assert cause in msg, msg
    assert fix in msg, msg


def test_mixed_precision_no_is_not_a_boolean(tmp_path):
    """YAML 1.1 reads `no` as False; the choice field takes it back as "no" (override and task file)."""
    assert load_config(TASK, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(TASK, ["train.mixed_precision=off"]).train.mixed_precision == "no"
    assert load_config(TASK, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    task = tmp_path / "t.yaml"
    task.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(task)).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected bool"):  # a real bool field is not a choice field
        load_config(TASK, ["train.ema=fp16"])


@pytest.mark.parametrize(
    "task, cause, fix",
    [
        ("tasks/jpeg_tinny.yaml", "task file 'tasks/jpeg_tinny.yaml' not found", "did you mean 'jpeg_tiny'"),
        ("bad_yaml", "is not valid YAML", "line"),
    ],
    ids=["missing-task-file", "invalid-yaml"],
)
def test_bad_task_file(tmp_path, task, cause, fix):
    if task == "bad_yaml":
        task = str(tmp_path / "bad.yaml")
        Path(task).write_text("train: {num_epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(task)
    assert cause in str(err.value) and fix in str(err.value)


# ------------------------------------------------------------------ caught by the run before loading
def _reward_script(tmp_path, body: str, name: str = "my_reward.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def _rewards_override(tmp_path, body: str, name: str) -> str:
    return "rewards=[{name: " + _reward_script(tmp_path, body, name) + "}]"


TRAINER_CASES = {
    "prompt-file-missing": (
        lambda tp: ["train.prompts=/no/such/prompts.txt"],
        FileNotFoundError,
        "neither a prompt set",
        "one prompt per line",
    ),
    "prompt-file-empty": (
        lambda tp: ["train.prompts=" + _reward_script(tp, "# just a comment\n\n", "p.txt")],
        ConfigError,
        "has no prompts",
        "add at least one",
    ),
    "prompt-list-empty": (lambda tp: ["train.prompts=[]"], ConfigError, "has no prompts", "add at least one"),
    "unknown-reward": (
        lambda tp: ["rewards=[{name: jpeg_compresibility}]"],
        ConfigError,
        "unknown reward 'jpeg_compresibility'",
        "Did you mean 'jpeg_compressibility'",
    ),
    "reward-script-missing": (
        lambda tp: [f"rewards=[{{name: {tp}/nope.py}}]"],
        FileNotFoundError,
        "not found",
        "defining reward_fn(images, prompts, metadata)",
    ),
    "reward-script-no-function": (
        lambda tp: [_rewards_override(tp, "X = 1\n", "empty_reward.py")],
        ConfigError,
        "defines neither reward_fn",
        "make_reward(**kwargs)",
    ),
    "reward-script-broken": (
        lambda tp: [_rewards_override(tp, "import no_such_module_xyz\n", "broken_reward.py")],
        RewardError,
        "failed to import: ModuleNotFoundError",
        "fix the script",
    ),
    "model-folder-missing": (
        lambda tp: [f"model.pretrained={tp}/no_model"],
        FileNotFoundError,
        "does not exist",
        "model_index.json",
    ),
    "model-folder-not-a-pipeline": (
        lambda tp: [f"model.pretrained={tp}"],
        FileNotFoundError,
        "has no model_index.json",
        "save_pretrained",
    ),
    "model-not-on-hub": (
        lambda tp: ["model.pretrained=nobody-xyz/no-such-model"],
        FileNotFoundError,
        "neither a local folder nor a reachable hub pipeline",
        "give a local diffusers pipeline folder",
    ),
    "resume-without-checkpoint": (
        lambda tp: ["train.resume=auto"],
        ConfigError,
        "no complete checkpoint",
        "drop train.resume",
    ),
    "resume-from-non-checkpoint": (
        lambda tp: [f"train.resume={tp}"],
        ConfigError,
        "is not a complete flowrl checkpoint",
        "train.resume=auto",
    ),
}


@pytest.mark.parametrize("make, exc, cause, fix", TRAINER_CASES.values(), ids=TRAINER_CASES.keys())
def test_bad_input_stops_the_run_before_loading(tmp_path, monkeypatch, make, exc, cause, fix):
    import flowrl.models
    from flowrl.run import Run

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(flowrl.models, "load_pipeline", no_loading)
    out = tmp_path / "out"
    cfg = load_config(TASK, [f"train.output_dir={out}", "train.run_name=run", *make(tmp_path)])
    with pytest.raises(exc) as err:
        Run(cfg)
    msg = str(err.value)
    assert cause in msg, msg
    assert fix in msg, msg
    assert not (out / "run" / "checkpoints").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n")
    for extra, expect in [
        ([f"train.prompts={prompts}"], "has no prompts"),
        (["rewards=[{name: jpg}]"], "unknown reward 'jpg'"),
        (["train.mixed_precision=fp8"], "unknown precision"),
    ]:
        rc = cli_main(["train", TASK, f"train.output_dir={tmp_path}", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("flowrl: error: ") and expect in err, err
        assert "Traceback" not in err
    assert not list(tmp_path.rglob("checkpoints"))


def test_sample_cli_bad_reward_is_one_line(tmp_path, capsys):
    base = [
        "sample",
        "--model",
        "tiny",
        "--prompt",
        "a cat",
        "--out",
        str(tmp_path / "s"),
        "--guide",
        "best-of-n",
    ]
    for extra, expect in [
        (
            ["--reward", "jpeg_compresibility"],
            "unknown reward 'jpeg_compresibility'. Did you mean 'jpeg_compressibility'",
        ),
        (
            ["--reward", "jpeg_compressibility", "--reward-kwargs", "{quality: 80}"],
            "--reward-kwargs is not valid JSON",
        ),
        (["--reward", "jpeg_compressibility", "--reward-kwargs", "[80]"], "must be a JSON object"),
    ]:
        rc = cli_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("flowrl: error: ") and expect in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_sample_cli_checks_its_options_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """Each mistake is one 'flowrl: error' line naming the option, before any pipeline loads."""
    import flowrl.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the options were checked")

    monkeypatch.setattr(flowrl.models, "load_pipeline", no_loading)
    (tmp_path / "state.json").write_text("{}")
    base = ["sample", "--model", "tiny", "--out", str(tmp_path / "s")]
    cases = [
        ([], "give at least one --prompt or --prompts-file"),
        (
            ["--prompts-file", str(tmp_path / "none.txt")],
            f"--prompts-file {tmp_path / 'none.txt'}: no such file",
        ),
        (
            ["--prompt", "a", "--lora", str(tmp_path / "nope")],
            "does not exist; give a flowrl checkpoint folder",
        ),
        (["--prompt", "a", "--lora", str(tmp_path / "state.json")], "is not a .safetensors weights file"),
        (
            ["--prompt", "a", "--guide", "rlg"],
            "--guide rlg mixes the base model and a fine-tune: give --lora",
        ),
        (["--prompt", "a", "--guide", "smc"], "--guide smc needs --reward"),
        (
            ["--prompt", "a", "--guide", "reward-grad", "--reward", "jpeg_compressibility"],
            "'jpeg_compressibility' is not differentiable; use --guide best-of-n or --guide smc",
        ),
        (
            [
                "--prompt",
                "a",
                "--guide",
                "best-of-n",
                "--reward",
                "jpeg_compressibility",
                "--save-trajectory",
            ],
            "--save-trajectory records plain or RL-guided chains, not --guide best-of-n",
        ),
    ]
    for extra, expect in cases:
        rc = cli_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("flowrl: error: ") and expect in err, (extra, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ reward output
IMAGES = torch.rand(3, 3, 8, 8)
PROMPTS = ["a cat", "a dog", "a cow"]
REWARD_CASES = {
    "raises": (
        "raise RuntimeError('scorer crashed')",
        "raised RuntimeError: scorer crashed",
        "fix the reward function",
    ),
    "nan": (
        "return torch.tensor([1.0, float('nan'), 0.0])",
        "non-finite values (NaN or inf) at batch positions [1]",
        "clamp its output",
    ),
    "inf": ("return [1.0, 2.0, float('inf')]", "non-finite", "fix the reward or clamp"),
    "wrong-shape": ("return torch.ones(3, 2)", "returned shape (3, 2) for a batch of 3", "shape (3,)"),
    "too-few": ("return [1.0, 2.0]", "returned shape (2,)", "one float per image"),
    "scalar": ("return 1.0", "returned shape ()", "one float per image"),
    "strings": ("return ['high', 'low', 'mid']", "which is not numbers", "return a (B,) tensor of floats"),
    "complex-dtype": (
        "return torch.ones(3, dtype=torch.complex64)",
        "returned complex numbers",
        "return a (B,) float tensor",
    ),
    "meta-device": (
        "return torch.empty(3, device='meta')",
        "on the meta device",
        "compute the rewards on the images' device",
    ),
}


@pytest.mark.parametrize("body, cause, fix", REWARD_CASES.values(), ids=REWARD_CASES.keys())
def test_bad_reward_output(tmp_path, body, cause, fix):
    path = _reward_script(
        tmp_path, f"import torch\n\ndef reward_fn(images, prompts, metadata):\n    {body}\n", "bad_reward.py"
    )
    with pytest.raises(RewardError) as err:
        Reward([{"name": path}])(IMAGES, PROMPTS)
    msg = str(err.value)
    assert cause in msg and fix in msg and "bad_reward.py" in msg, msg


def test_reward_on_another_dtype_is_converted(tmp_path):
    """Integer, float64 and bool rewards are fine: they become float32 on the reward's device."""
    path = _reward_script(
        tmp_path,
        "import torch\n\ndef reward_fn(images, prompts, metadata):\n    return torch.arange(3, dtype=torch.float64)\n",
    )
    values, _ = Reward([{"name": path}])(IMAGES, PROMPTS)
    assert values.dtype == torch.float32 and values.tolist() == [0.0, 1.0, 2.0]


# ------------------------------------------------------------------ robot tasks
ROBOT_CONFIG_CASES = {
    "unknown-env": (["env.id=NoSuchEnv-v0"], "unknown environment 'NoSuchEnv-v0'", "registered gymnasium id"),
    "misspelled-env": (
        ["env.id=InvertedPendulum-v55"],
        "unknown environment",
        "did you mean 'InvertedPendulum-v5'",
    ),
    "misspelled-key": (
        ["algorithm.clip_rnage=0.1"],
        "unknown config key 'algorithm.clip_rnage'",
        "did you mean 'clip_range'",
    ),
    "algorithm-policy-mismatch": (
        ["algorithm.name=dppo"],
        "fine-tunes a diffusion_policy but model.family='flow_policy'",
        "use algorithm.name=reinflow",
    ),
    "negative-lr": (["optim.learning_rate=-1e-4"], "must be > 0, got -0.0001", "optim.learning_rate=3e-4"),
    "clip-range-0": (["algorithm.clip_range=0"], "clip_range must be > 0", "algorithm.clip_range=0.01"),
    "num-steps-0": (["sampler.num_steps=0"], "num_steps must be >= 1", "sampler.num_steps=4"),
    "num-envs-0": (["env.num_envs=0"], "env.num_envs must be >= 1", "env.num_envs=8"),
    "demo-format": (["demos.format=hdf"], "unknown format 'hdf'", "choose one of"),
}


@pytest.mark.parametrize("overrides, cause, fix", ROBOT_CONFIG_CASES.values(), ids=ROBOT_CONFIG_CASES.keys())
def test_bad_robot_config_is_rejected_at_load(overrides, cause, fix):
    with pytest.raises(ConfigError) as err:
        load_config(ROBOT_TASK, overrides)
    msg = str(err.value)
    assert cause in msg and fix in msg, msg


def _npz(tmp_path, **arrays) -> str:
    path = tmp_path / "demos.npz"
    np.savez(path, **arrays)
    return str(path)


DEMO_CASES = {
    "obs-3d": (
        lambda tp: _npz(tp, observations=np.zeros((10, 2, 2)), actions=np.zeros((10, 1)), episode_ends=[10]),
        "must be (N, D) arrays, got (10, 2, 2)",
        "one row per step",
    ),
    "length-mismatch": (
        lambda tp: _npz(tp, observations=np.zeros((10, 4)), actions=np.zeros((9, 1)), episode_ends=[10]),
        "10 observations but 9 actions",
        "drop each episode's final observation",
    ),
    "bad-episode-ends": (
        lambda tp: _npz(tp, observations=np.zeros((10, 4)), actions=np.zeros((10, 1)), episode_ends=[6, 4]),
        "episode_ends must increase strictly",
        "np.cumsum(episode_lengths)",
    ),
    "missing-arrays": (
        lambda tp: _npz(tp, obs=np.zeros((10, 4)), actions=np.zeros((10, 1))),
        "missing arrays ['episode_ends', 'observations']",
        "Demonstrations(...).save(path)",
    ),
    "nan": (
        lambda tp: _npz(
            tp, observations=np.full((10, 4), np.nan), actions=np.zeros((10, 1)), episode_ends=[10]
        ),
        "contain NaN or inf",
        "drop or repair",
    ),
    "wrong-env-dims": (
        lambda tp: _npz(tp, observations=np.zeros((10, 7)), actions=np.zeros((10, 1)), episode_ends=[10]),
        "observations of dim 7 and actions of dim 1, but InvertedPendulum-v5 has 4 and 1",
        "set env.id to the environment they come from",
    ),
    "file-missing": (lambda tp: str(tp / "nope.npz"), "does not exist", "demos.expert to generate"),
}


@pytest.mark.parametrize("make, cause, fix", DEMO_CASES.values(), ids=DEMO_CASES.keys())
def test_bad_demonstrations_stop_pretraining(tmp_path, make, cause, fix):
    from flowrl.pretrain import pretrain

    cfg = load_config(ROBOT_TASK, [f"train.output_dir={tmp_path / 'out'}", f"demos.path={make(tmp_path)}"])
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        pretrain(cfg, "robot", progress=False)
    msg = str(err.value)
    assert cause in msg and fix in msg, msg
    assert not (tmp_path / "out").exists()  # no half-made policy folder


def test_robot_train_without_bc_policy(tmp_path, capsys):
    rc = cli_main(["train", ROBOT_TASK, f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no pre-trained policy" in err and "flowrl pretrain" in err, err
    assert not list(tmp_path.rglob("checkpoints"))


def test_corpus_is_large_enough():
    n = len(CONFIG_CASES) + len(TRAINER_CASES) + len(REWARD_CASES) + len(ROBOT_CONFIG_CASES) + len(DEMO_CASES)
    assert n >= 30, n
    json.dumps(list(CONFIG_CASES))  # ids are plain strings
