"""The bad-input corpus: what a hostile new user types, each case one in-process ``flowrl`` call
that must end with exit code 2, one ``flowrl: error:`` line naming the cause, no traceback, and
nothing left in the output folder. Configs, task and prompt files, model folders, checkpoints,
reward scripts, output locations, the sample / evaluate options and robot inputs.

Most cases fail before any weights load (milliseconds); the few that need a model (a reward that
misbehaves when called, a corrupt checkpoint's weights, a non-finite update) use a run of one
epoch of two 8x8 samples with two denoising steps on one thread."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.test_bad_input import CONFIG_CASES, DEMO_CASES, ROBOT_CONFIG_CASES

from .conftest import ROBOT_TASK, TASK, TINY, leftovers, train, write


def reward(tp: Path, body: str, name: str = "user_reward.py") -> str:
    return "rewards=[{name: " + write(tp / "scripts" / name, body) + "}]"


def call_reward(line: str) -> str:
    return f"import sys, time\nimport torch\n\ndef reward_fn(images, prompts, metadata):\n    {line}\n"


# ---------------------------------------------------------------- configs (through the CLI)
@pytest.mark.parametrize("overrides, cause, fix", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config(refuse, tmp_path, overrides, cause, fix):
    out = tmp_path / "out"
    msg = refuse(train(out, *overrides), cause, out)
    assert fix in msg, msg


@pytest.mark.parametrize("overrides, cause, fix", ROBOT_CONFIG_CASES.values(), ids=ROBOT_CONFIG_CASES.keys())
def test_robot_config(refuse, tmp_path, overrides, cause, fix):
    out = tmp_path / "out"
    msg = refuse(["train", ROBOT_TASK, f"train.output_dir={out}", *overrides], cause, out)
    assert fix in msg, msg


MORE_CONFIG = {
    "lr-inf": (["optim.learning_rate=.inf"], "must be > 0, got inf and 0.001, and finite"),
    "lr-nan": (["optim.learning_rate=.nan"], "must be > 0, got nan"),
    "value-lr-inf": (["optim.value_learning_rate=.inf"], "and inf, and finite"),
    "run-name-parent": (
        ["train.run_name=../escape"],
        "train.run_name '../escape' must be a plain folder name",
    ),
    "run-name-dotdot": (["train.run_name=.."], "must be a plain folder name"),
    "run-name-nested": (["train.run_name=a/b"], "no '/'"),
    "run-name-empty": (["train.run_name=' '"], "must be a plain folder name"),
    "reward-timeout-0": (["reward_timeout=0"], "reward_timeout must be a positive number of seconds"),
    "reward-timeout-inf": (["reward_timeout=.inf"], "or null (no limit), got inf"),
    "override-bad-yaml": (["train.prompts=[a"], "value is not valid YAML"),
    "renamed-key": (["optim.actor_lr=1e-4"], "is now optim.learning_rate"),
    "unknown-top-level": (["rewardz=1"], "unknown config key 'rewardz'"),
    "kind-robot": (["kind=robot"], "kind: robot is now kind: env"),
    "env-section-for-images": (["env.id=Hopper-v5"], "env: this section is for kind: env tasks"),
    "image-size-huge": (["model.tiny_image_size=65536"], "multiple of 8 in [8, 512], got 65536"),
    "image-size-odd": (["model.tiny_image_size=30"], "got 30"),
    "hidden-width-0": (
        ["model.value_hidden_dims=[0]"],
        "model.value_hidden_dims must be widths in [1, 65536]",
    ),
}


@pytest.mark.parametrize("overrides, cause", MORE_CONFIG.values(), ids=MORE_CONFIG.keys())
def test_more_config(refuse, tmp_path, overrides, cause):
    out = tmp_path / "out"
    refuse(train(out, *overrides), cause, out)


def test_pretrain_lr_inf(refuse, tmp_path):
    out = tmp_path / "out"
    refuse(["pretrain", ROBOT_TASK, f"train.output_dir={out}", "pretrain.learning_rate=.inf"], "finite", out)


# ---------------------------------------------------------------- task files
TASK_FILES = {
    "not-utf8": (b"train:\n  num_epochs: 3  # caf\xe9\n", "task file", "is not UTF-8 text"),
    "a-list": ("- model\n- sampler\n", "task file", "must be a mapping of sections"),
    "invalid-yaml": ("train: {num_epochs: 3\n", "task file", "is not valid YAML"),
    "tabs": ("train:\n\tnum_epochs: 3\n", "task file", "is not valid YAML"),
    "unknown-section": (
        "optimiser:\n  learning_rate: 1e-4\n",
        "unknown config key 'optimiser'",
        "did you mean",
    ),
    "string-section": ("model: tiny\n", "model: expected a section", "model.pretrained=..."),
    "unknown-kind": ("kind: video\n", "unknown task kind 'video'", "choose one of"),
}


@pytest.mark.parametrize("content, cause, fix", TASK_FILES.values(), ids=TASK_FILES.keys())
def test_task_file(refuse, tmp_path, content, cause, fix):
    out = tmp_path / "out"
    task = write(tmp_path / "task.yaml", content)
    msg = refuse(["train", task, f"train.output_dir={out}"], cause, out)
    assert fix in msg, msg


def test_task_file_is_a_folder(refuse, tmp_path):
    (tmp_path / "t.yaml").mkdir()
    refuse(["train", str(tmp_path / "t.yaml"), f"train.output_dir={tmp_path / 'out'}"], "not found")


def test_task_file_missing(refuse, tmp_path):
    refuse(["train", "tasks/jpeg_tinyy.yaml"], "did you mean 'jpeg_tiny'")


# ---------------------------------------------------------------- prompt files
PROMPT_FILES = {
    "not-utf8": (b"a cat\n\xff\xfe a dog\n", "is not UTF-8 text"),
    "only-comments": ("# a cat\n\n", "has no prompts"),
    "a-folder": (None, "has no train split"),  # a folder is a split folder (train_metadata.jsonl, train.txt)
}


@pytest.mark.parametrize("content, cause", PROMPT_FILES.values(), ids=PROMPT_FILES.keys())
def test_prompt_file(refuse, tmp_path, content, cause):
    out = tmp_path / "out"
    path = tmp_path / "prompts.txt"
    if content is None:
        path.mkdir()
    else:
        write(path, content)
    refuse(train(out, f"train.prompts={path}"), cause, out)


def test_prompt_file_missing(refuse, tmp_path):
    out = tmp_path / "out"
    refuse(train(out, f"train.prompts={tmp_path / 'none.txt'}"), "neither a prompt set", out)


def test_sample_prompts_file_not_utf8(refuse, tmp_path):
    path = write(tmp_path / "p.txt", b"\xff\xfe\x00a\n")
    out = tmp_path / "out"
    refuse(["sample", "--prompts-file", path, "--out", out], "is not UTF-8 text", out)


# ---------------------------------------------------------------- model folders
MODEL_FOLDERS = {
    "index-not-json": (
        {"model_index.json": '{"_class_name": "StableDiffusionPipeline",'},
        "is not valid JSON",
    ),
    "index-empty": ({"model_index.json": ""}, "is not valid JSON"),
    "index-a-list": ({"model_index.json": "[1, 2]"}, "is a unknown pipeline"),
    "index-other-pipeline": (
        {"model_index.json": '{"_class_name": "AudioLDMPipeline"}'},
        "AudioLDMPipeline pipeline",
    ),
    "index-not-utf8": ({"model_index.json": b'{"_class_name": "\xff"}'}, "is not UTF-8 text"),
    "no-index": ({"unet/config.json": "{}"}, "has no model_index.json"),
    "policy-json-broken": ({"policy.json": "{kind: flow"}, "is not valid JSON"),
}


@pytest.mark.parametrize("files, cause", MODEL_FOLDERS.values(), ids=MODEL_FOLDERS.keys())
def test_model_folder(refuse, tmp_path, files, cause):
    model = tmp_path / "model"
    for name, content in files.items():
        write(model / name, content)
    out = tmp_path / "out"
    refuse(train(out, f"model.pretrained={model}"), cause, out)


def test_model_folder_missing(refuse, tmp_path):
    out = tmp_path / "out"
    refuse(train(out, f"model.pretrained={tmp_path / 'nope'}"), "does not exist", out)


# ---------------------------------------------------------------- output locations
def test_output_dir_is_a_file(refuse, tmp_path):
    out = Path(write(tmp_path / "out", "x"))
    refuse(train(out, *TINY), "Not a directory")
    assert out.read_text() == "x"


def test_output_dir_under_a_file(refuse, tmp_path):
    blocker = Path(write(tmp_path / "file", "x"))
    refuse(train(blocker / "out", *TINY), "Not a directory")


def test_output_dir_not_writable(refuse, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; /proc refuses even root
        refuse(train(Path("/proc/flowrl-out"), *TINY), "/proc/flowrl-out")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refuse(train(ro / "out", *TINY), "Permission denied", ro)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------- the sample command's options
SAMPLE_CASES = {
    "n-0": (["--prompt", "a", "-n", "0"], "-n/--num-per-prompt must be >= 1"),
    "num-steps-0": (["--prompt", "a", "--num-steps", "0"], "--num-steps must be >= 1"),
    "image-size-huge": (
        ["--prompt", "a", "--tiny-image-size", "65536"],
        "multiple of 8 in [8, 512], got 65536",
    ),
    "image-size-odd": (["--prompt", "a", "--tiny-image-size", "12"], "got 12"),
    "particles-0": (["--prompt", "a", "--particles", "0"], "--particles must be >= 1"),
    "guide-scale-nan": (["--prompt", "a", "--guide-scale", "nan"], "--guide-scale must be a finite number"),
    "rlg-weight-inf": (["--prompt", "a", "--rlg-weight", "inf"], "--rlg-weight must be a finite number"),
    "smc-lambda-0": (
        ["--prompt", "a", "--guide", "smc", "--reward", "jpeg_compressibility", "--smc-lambda", "0"],
        "--smc-lambda must be > 0",
    ),
    "guidance-below-1": (["--prompt", "a", "--guidance-scale", "0.5"], "--guidance-scale must be >= 1"),
    "device-unknown": (["--prompt", "a", "--device", "tpu"], "--device 'tpu'"),
    "steps-not-a-number": (["--prompt", "a", "--num-steps", "ten"], "invalid int value: 'ten'"),
    "guide-unknown": (["--prompt", "a", "--guide", "beam"], "invalid choice: 'beam'"),
    "unknown-option": (["--prompt", "a", "--steps", "4"], "unrecognized arguments: --steps"),
    "reward-script-missing": (["--prompt", "a", "--guide", "best-of-n", "--reward", "nope.py"], "not found"),
    "model-folder-missing": (["--prompt", "a", "--model", "./no_model"], "does not exist"),
}


@pytest.mark.parametrize("extra, cause", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_options(refuse, tmp_path, extra, cause):
    out = tmp_path / "out"
    refuse(["sample", "--out", out, *extra], cause, out)


def test_sample_failing_mid_sampling_leaves_no_folder(refuse, tmp_path):
    """The guidance reward raises once the model has sampled: the --out folder is never made."""
    out = tmp_path / "out"
    script = write(tmp_path / "bad_reward.py", call_reward("raise ValueError('broken scorer')"))
    argv = ["sample", "--prompt", "a", "--out", out, "--tiny-image-size", "8", "--num-steps", "2"]
    refuse([*argv, "--guide", "best-of-n", "--particles", "2", "--reward", script], "broken scorer", out)
    assert not out.exists()


def test_sample_out_is_a_file(refuse, tmp_path):
    out = write(tmp_path / "out", "x")
    refuse(["sample", "--prompt", "a", "--out", out], "is a file, not a folder")


def test_sample_out_under_a_file(refuse, tmp_path):
    blocker = write(tmp_path / "f", "x")
    refuse(["sample", "--prompt", "a", "--out", f"{blocker}/imgs"], "is a file, so no folder can be made")


@pytest.mark.parametrize(
    "argv, cause",
    [([], "the following arguments are required: command"), (["trian"], "invalid choice: 'trian'")],
    ids=["no-command", "misspelt-command"],
)
def test_command_line(refuse, argv, cause):
    refuse(argv, cause)


# ---------------------------------------------------------------- robot inputs
@pytest.mark.parametrize("make, cause, fix", DEMO_CASES.values(), ids=DEMO_CASES.keys())
def test_demonstrations(refuse, tmp_path, make, cause, fix):
    out = tmp_path / "out"
    msg = refuse(
        ["pretrain", ROBOT_TASK, f"train.output_dir={out}", f"demos.path={make(tmp_path)}"], cause, out
    )
    assert fix in msg, msg


def test_pretrain_nonfinite_update_is_refused_and_not_saved(refuse, tmp_path):
    """A rate that makes the behavior-cloning weights inf/NaN stops at that step; no policy is saved
    (the generated demonstrations, a reusable cache, stay)."""
    out = tmp_path / "out"
    argv = ["pretrain", ROBOT_TASK, f"train.output_dir={out}", "pretrain.learning_rate=1e20"]
    refuse([*argv, "pretrain.steps=20", "pretrain.eval_episodes=0"], "the update made a weight NaN/inf")
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["demos.npz"]


def test_demonstrations_not_npz(refuse, tmp_path):
    out = tmp_path / "out"
    demos = write(tmp_path / "demos.npz", "observations,actions\n1,2\n")
    refuse(["pretrain", ROBOT_TASK, f"train.output_dir={out}", f"demos.path={demos}"], "demos.path=", out)


def _policy(tp: Path, files: dict) -> str:
    for name, content in files.items():
        write(tp / "policy" / name, content)
    return str(tp / "policy")


EVALUATE_CASES = {
    "episodes-0": (lambda tp: ["--episodes", "0"], "--episodes must be >= 1"),
    "particles-0": (lambda tp: ["--guide", "best-of-n", "--particles", "0"], "--particles must be >= 1"),
    "guide-needs-reward": (
        lambda tp: ["--guide", "smc", "--policy", _policy(tp, {})],
        "holds no policy.json",
    ),
    "policy-missing": (lambda tp: ["--policy", str(tp / "nope")], "holds no policy.json"),
    "policy-json-broken": (lambda tp: ["--policy", _policy(tp, {"policy.json": "{"})], "is not valid JSON"),
    "policy-kind-unknown": (
        lambda tp: ["--policy", _policy(tp, {"policy.json": '{"kind": "transformer"}'})],
        "unknown policy kind 'transformer'",
    ),
    "policy-weights-truncated": (
        lambda tp: [
            "--policy",
            _policy(tp, {"policy.json": '{"kind": "flow"}', "policy.safetensors": b"\x08\x00"}),
        ],
        "policy weights",
    ),
    "policy-arch-wrong": (
        lambda tp: [
            "--policy",
            _policy(
                tp, {"policy.json": '{"kind": "flow", "wings": 2}', "policy.safetensors": _empty_weights()}
            ),
        ],
        "do not fit each other",
    ),
    "out-is-a-folder": (lambda tp: ["--out", str(tp)], "is a folder; give a .json file path"),
    "image-task": (lambda tp: [], "flowrl evaluate is for kind: env tasks"),
}


def _empty_weights() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.zeros(1)})


@pytest.mark.parametrize("make, cause", EVALUATE_CASES.values(), ids=EVALUATE_CASES.keys())
def test_evaluate(refuse, tmp_path, make, cause):
    task = TASK if "kind: env" in cause else ROBOT_TASK
    out = tmp_path / "out"
    refuse(["evaluate", task, f"train.output_dir={out}", *make(tmp_path)], cause, out)


def test_robot_env_id_module_missing(refuse, tmp_path):
    out = tmp_path / "out"
    argv = ["pretrain", ROBOT_TASK, f"train.output_dir={out}", "env.id=no_such_module_xyz:Env"]
    refuse(argv, "module 'no_such_module_xyz' could not be imported (ModuleNotFoundError", out)


def test_robot_env_id_registers_nothing(refuse, tmp_path):
    out = tmp_path / "out"
    argv = ["pretrain", ROBOT_TASK, f"train.output_dir={out}", "env.id=json:NoEnv-v0"]
    refuse(argv, "importing 'json' registered no environment 'NoEnv-v0'", out)


# ---------------------------------------------------------------- reward scripts
IMPORT_CASES = {
    "exit-at-import": ("import sys\nsys.exit(3)\n", "failed to import: called sys.exit(3)"),
    "interrupt-at-import": ("raise KeyboardInterrupt\n", "interrupted while importing"),
    "error-at-import": ("1 / 0\n", "failed to import: ZeroDivisionError"),
    "syntax-error": ("def reward_fn(:\n", "failed to import: SyntaxError"),
    "no-function": ("X = 1\n", "defines neither reward_fn"),
    "wrong-attr": ("def reward_fn(i, p, m):\n    return [0.0] * len(p)\n", "defines no 'score'"),
}


@pytest.mark.parametrize("body, cause", IMPORT_CASES.values(), ids=IMPORT_CASES.keys())
def test_reward_script_at_import(refuse, tmp_path, body, cause):
    out = tmp_path / "out"
    name = f"r_{abs(hash(cause)) % 10**6}.py"
    path = tmp_path / "scripts" / name
    write(path, body)
    spec = f"{path}:score" if "'score'" in cause else str(path)
    refuse(train(out, *TINY, "rewards=[{name: " + spec + "}]"), cause, out)


# these need the model: the reward is called at the evaluation before training
CALL_CASES = {
    "raises": (
        call_reward("raise RuntimeError('scorer crashed')"),
        [],
        "raised RuntimeError: scorer crashed",
    ),
    "exit-0": (call_reward("sys.exit(0)"), [], "called sys.exit(0) while scoring"),
    "interrupt": (call_reward("raise KeyboardInterrupt"), [], "was interrupted (KeyboardInterrupt)"),
    "hangs": (
        call_reward("time.sleep(30)"),
        ["reward_timeout=0.5"],
        "did not return within reward_timeout=0.5 s",
    ),
    "wrong-shape": (call_reward("return torch.ones(len(prompts), 2)"), [], "returned shape (1, 2)"),
    "strings": (call_reward("return ['high'] * len(prompts)"), [], "which is not numbers"),
    "nan": (call_reward("return torch.full((len(prompts),), float('nan'))"), [], "non-finite rewards"),
    "factory-raises": (
        "def make_reward(**kwargs):\n    raise ValueError('weights missing')\n",
        [],
        "failed to build: ValueError: weights missing",
    ),
    "factory-not-a-function": (
        "def make_reward(**kwargs):\n    return 3\n",
        [],
        "returned int, not a function",
    ),
}


@pytest.mark.parametrize("body, extra, cause", CALL_CASES.values(), ids=CALL_CASES.keys())
def test_reward_when_called(refuse, tmp_path, body, extra, cause):
    out = tmp_path / "out"
    refuse(
        train(out, *TINY, *extra, reward(tmp_path, body, f"call_{abs(hash(cause)) % 10**6}.py")), cause, out
    )


def test_reward_options_that_do_not_fit(refuse, tmp_path):
    out = tmp_path / "out"
    spec = "rewards=[{name: jpeg_compressibility, kwargs: {qualty: 80}}]"
    refuse(train(out, *TINY, spec), "its options {'qualty': 80} do not fit its factory", out)


def test_reward_fn_given_options(refuse, tmp_path):
    out = tmp_path / "out"
    path = write(tmp_path / "scripts" / "plain_opts.py", call_reward("return [0.0] * len(prompts)"))
    refuse(train(out, *TINY, "rewards=[{name: " + path + ", kwargs: {scale: 2}}]"), "takes no options", out)


# ---------------------------------------------------------------- a non-finite update
def test_update_that_makes_weights_nonfinite(refuse, tmp_path):
    """A finite but absurd learning rate and weight decay make every weight inf in one AdamW step:
    the check after the step stops the run, naming the step and the fix; nothing is saved."""
    out = tmp_path / "out"
    msg = refuse(
        train(out, *TINY, "optim.learning_rate=1e20", "optim.weight_decay=1e20"),
        "the optimizer step at epoch 0, update pass 0, minibatch 0 (global step 1) made trained weights non-finite",
        out,
    )
    assert "lower optim.learning_rate" in msg


# ---------------------------------------------------------------- checkpoints and resume
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One finished tiny run (its checkpoint epoch_000001), copied by each case before it breaks it."""
    from flowrl.cli import main

    out = tmp_path_factory.mktemp("trained")
    assert main(train(out, *TINY)) == 0
    return out / "r"


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(trained, out / "r")
    return out, out / "r" / "checkpoints" / "epoch_000001"


CHECKPOINT_CASES = {
    "state-truncated": (lambda c: write(c / "state.json", '{"next_epoch": 1, "glob'), "is not valid JSON"),
    "state-no-epoch": (lambda c: write(c / "state.json", "{}"), "holds no next_epoch"),
    "weights-truncated": (
        lambda c: write(c / "trainable.safetensors", (c / "trainable.safetensors").read_bytes()[:100]),
        "checkpoint weights",
    ),
    "optimizer-corrupt": (
        lambda c: write(c / "optimizer.pt", b"PK\x03\x04garbage"),
        "checkpoint optimizer state",
    ),
    "optimizer-missing": (lambda c: (c / "optimizer.pt").unlink(), "optimizer state"),
}


@pytest.mark.parametrize("breaks, cause", CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
def test_broken_checkpoint(refuse, tmp_path, trained, breaks, cause):
    out, ckpt = _copy(trained, tmp_path)
    breaks(ckpt)
    before = leftovers(out)
    refuse(train(out, *TINY, "train.num_epochs=2", "train.resume=auto"), cause)
    assert leftovers(out) == before  # nothing added, nothing removed


@pytest.mark.parametrize(
    "change, cause",
    [
        ("train.seed=1", "train.seed (0 -> 1)"),
        ("optim.learning_rate=1e-4", "optim.learning_rate (0.001 -> 0.0001)"),
        ("model.finetune=lora", "model.finetune ('full' -> 'lora')"),
    ],
    ids=["seed", "learning-rate", "finetune"],
)
def test_resume_with_a_changed_config(refuse, tmp_path, trained, change, cause):
    out, _ = _copy(trained, tmp_path)
    before = leftovers(out)
    msg = refuse(train(out, *TINY, "train.num_epochs=2", change, "--resume", "auto"), cause)
    assert "--allow-config-change" in msg
    assert leftovers(out) == before


def test_resume_config_check_allows_length_and_logging(trained):
    from flowrl.config import load_config
    from flowrl.runfolder import check_resume

    ckpt = trained / "checkpoints" / "epoch_000001"
    base = [f"train.output_dir={trained.parent}", "train.run_name=r", *TINY]
    ok = load_config(TASK, [*base, "train.num_epochs=3", "train.eval_every=1", "train.save_every=1"])
    assert check_resume(ok, ckpt) == []
    allowed = load_config(TASK, [*base, "train.seed=3", "train.resume_allow_changes=true"])
    assert check_resume(allowed, ckpt) == ["train.seed (0 -> 3)"]


def test_resume_from_a_non_checkpoint(refuse, tmp_path):
    out = tmp_path / "out"
    refuse(train(out, *TINY, f"train.resume={tmp_path}"), "is not a complete flowrl checkpoint", out)


# ---------------------------------------------------------------- a run folder in use
def test_second_writer_of_a_run_folder(refuse, tmp_path):
    run = tmp_path / "out" / "r"
    run.mkdir(parents=True)
    lock = run / ".flowrl.lock"
    lock.write_text(f"1 {socket.gethostname()}\n")  # pid 1 is alive
    refuse(train(tmp_path / "out", *TINY), "is being written by process 1")
    assert leftovers(tmp_path / "out") == ["r", "r/.flowrl.lock"] and lock.read_text().startswith("1 ")


def test_stale_lock_is_taken_over(tmp_path, capsys):
    from flowrl.runfolder import RunFolder

    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / ".flowrl.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    lock = RunFolder(folder)
    lock.acquire()
    assert "which is gone" in capsys.readouterr().err
    assert (folder / ".flowrl.lock").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (folder / ".flowrl.lock").exists()


def test_failed_save_leaves_no_temporary_folder(tmp_path):
    """A save that fails halfway (here: an optimizer state torch cannot pickle, as a full disk
    fails a write) removes its temporary folder; no epoch folder appears."""
    import torch

    from flowrl.checkpoint import save_checkpoint

    with pytest.raises((AttributeError, TypeError)):  # pickle: "Can't pickle local object"
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"bad": lambda: 0}, {"next_epoch": 1})
    assert leftovers(tmp_path / "checkpoints") == []


def test_corpus_size():
    n = sum(
        len(c)
        for c in (
            CONFIG_CASES,
            ROBOT_CONFIG_CASES,
            MORE_CONFIG,
            TASK_FILES,
            PROMPT_FILES,
            MODEL_FOLDERS,
            SAMPLE_CASES,
            DEMO_CASES,
            EVALUATE_CASES,
            IMPORT_CASES,
            CALL_CASES,
            CHECKPOINT_CASES,
        )
    )
    assert n >= 100, n  # besides the single cases of this file
