"""The reward guard on every path that calls a reward (issue 18): ``flowrl sample --guide``'s
rewards (best-of-N, SMC and reward-gradient guidance, whose reward runs with gradients), the
robot action rewards of ``flowrl evaluate --guide``, and the differentiable rewards that reward
backprop objectives call inside the update for their gradients. A reward that blocks past its
timeout, calls ``sys.exit()`` or raises ``KeyboardInterrupt`` is one ``flowrl: error:`` line naming
the reward, exit code 2, and nothing is left behind (no --out folder or file, no run folder)."""

from pathlib import Path

import pytest
import torch

from .conftest import ROBOT_TASK, TINY, train, write

SAMPLE = ["sample", "--prompt", "a", "--tiny-image-size", "8", "--num-steps", "2"]


def script(tmp_path: Path, name: str, body: str) -> str:
    header = "import sys, time\nimport torch\n\nDIFFERENTIABLE = True\n\n"
    return write(tmp_path / "scripts" / name, header + body)


def image_reward(line: str, only_with_grad: bool = False) -> str:
    """A differentiable image reward (the mean pixel) that misbehaves with ``line`` (only on
    images that need gradients, when asked: the reward backprop objectives' own calls)."""
    guard = "    if images.requires_grad:\n    " if only_with_grad else ""
    return f"def reward_fn(images, prompts, metadata):\n{guard}    {line}\n    return images.mean(dim=(1, 2, 3))\n"


MISBEHAVES = {
    "hangs": ("time.sleep(10)", "did not return within --reward-timeout=0.5 s"),
    "exit-0": ("sys.exit(0)", "called sys.exit(0) while scoring"),
    "exit-3": ("sys.exit(3)", "called sys.exit(3) while scoring"),
    "interrupt": ("raise KeyboardInterrupt", "was interrupted (KeyboardInterrupt) while scoring"),
}
GUIDES = {
    "best-of-n": ["--guide", "best-of-n", "--particles", "2"],
    "smc": ["--guide", "smc", "--particles", "2"],
    "reward-grad": ["--guide", "reward-grad"],  # the reward runs on images that need gradients
}
SAMPLE_CASES = {
    f"{guide}-{what}": (GUIDES[guide], line, cause)
    for guide in GUIDES
    for what, (line, cause) in MISBEHAVES.items()
    # every misbehaviour through best-of-N; SMC and the gradient path (its own call) once each way
    if guide == "best-of-n"
    or (guide, what) in (("smc", "exit-3"), ("reward-grad", "hangs"), ("reward-grad", "exit-0"))
}


@pytest.mark.parametrize("guide, line, cause", SAMPLE_CASES.values(), ids=SAMPLE_CASES.keys())
def test_sample_guidance_reward(refuse, tmp_path, guide, line, cause):
    out = tmp_path / "out"
    path = script(tmp_path, f"g_{abs(hash((tuple(guide), line))) % 10**6}.py", image_reward(line))
    msg = refuse([*SAMPLE, "--out", out, *guide, "--reward", path, "--reward-timeout", "0.5"], cause, out)
    assert Path(path).name in msg  # the reward is named
    assert not out.exists()


def test_sample_reward_timeout_must_be_positive(refuse, tmp_path):
    out = tmp_path / "out"
    argv = [*SAMPLE, "--out", out, "--guide", "best-of-n", "--reward", "jpeg_compressibility"]
    refuse([*argv, "--reward-timeout", "0"], "--reward-timeout must be a positive number of seconds", out)
    refuse([*argv, "--reward-timeout", "inf"], "--reward-timeout must be a positive number of seconds", out)


# ---------------------------------------------------------------- reward backprop's own calls
BACKPROP_CASES = {
    "hangs": ("time.sleep(10)", ["reward_timeout=0.5"], "did not return within reward_timeout=0.5 s"),
    "exit-0": ("sys.exit(0)", [], "called sys.exit(0) while scoring"),
    "interrupt": ("raise KeyboardInterrupt", [], "was interrupted (KeyboardInterrupt) while scoring"),
}


@pytest.mark.parametrize("line, extra, cause", BACKPROP_CASES.values(), ids=BACKPROP_CASES.keys())
def test_reward_backprop_reward(refuse, tmp_path, line, extra, cause):
    """DRaFT-1 calls the reward on decoded images with gradients inside its loss; the reward
    scores the evaluation and the epoch's samples without gradients first, and then misbehaves."""
    out = tmp_path / "out"
    path = script(tmp_path, f"bp_{abs(hash(line)) % 10**6}.py", image_reward(line, only_with_grad=True))
    refuse(train(out, *TINY, *extra, "algorithm.name=draft", "rewards=[{name: " + path + "}]"), cause, out)


def test_reward_backprop_gradient_through_the_reward_thread():
    """A reward called on images that need gradients under a timeout runs in the reward thread
    and returns a graph the caller differentiates: the gradient equals the inline call's, and the
    caller's autocast reaches it (both are thread-local)."""
    from flowrl.rewards import Reward

    images = torch.rand(3, 3, 4, 4, requires_grad=True)
    grads = []
    for timeout in (None, 60.0):
        reward = Reward([{"name": "jpeg_compressibility"}], timeout=timeout)
        reward.terms = [("square", 1.0, lambda im, p, m: (im**2).sum(dim=(1, 2, 3)))]
        r, _ = reward(images, ["a"] * 3)
        (g,) = torch.autograd.grad(r.sum(), images)
        grads.append(g)
        reward.close()
    assert torch.equal(grads[0], grads[1]) and torch.allclose(grads[0], 2 * images.detach())

    seen = []
    reward = Reward([{"name": "jpeg_compressibility"}], timeout=60.0)
    reward.terms = [
        ("dtype", 1.0, lambda im, p, m: seen.append(torch.mm(im[0, 0], im[0, 0]).dtype) or im.sum((1, 2, 3)))
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reward(images, ["a"] * 3)
    reward.close()
    assert seen == [torch.bfloat16]


# ---------------------------------------------------------------- robot action rewards
def action_reward(line: str) -> str:
    return f"def action_reward(obs, actions):\n    {line}\n    return -(actions**2).sum(-1).mean(-1)\n"


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    """A saved flow policy for InvertedPendulum (random weights: evaluation needs no skill)."""
    from flowrl.models.policy import FlowPolicy

    folder = tmp_path_factory.mktemp("policy") / "p"
    torch.manual_seed(0)
    p = FlowPolicy(obs_dim=4, action_dim=1, obs_horizon=1, action_horizon=4, hidden_dims=[16])
    p.normalizer.fit(torch.randn(100, 4) * 0.1, torch.tensor([-3.0]), torch.tensor([3.0]))
    p.save(folder)
    return str(folder)


EVAL_GUIDES = {
    "best-of-n": ["--guide", "best-of-n", "--particles", "2"],
    "smc": ["--guide", "smc", "--particles", "2"],
    "reward-grad": ["--guide", "reward-grad"],
}
ACTION_CASES = {
    f"{guide}-{what}": (EVAL_GUIDES[guide], line, cause)
    for guide in EVAL_GUIDES
    for what, (line, cause) in MISBEHAVES.items()
    if guide == "best-of-n" or (guide, what) in (("smc", "exit-3"), ("reward-grad", "hangs"))
}


@pytest.mark.parametrize("guide, line, cause", ACTION_CASES.values(), ids=ACTION_CASES.keys())
def test_action_reward(refuse, tmp_path, policy, guide, line, cause):
    out = tmp_path / "out"
    path = script(tmp_path, f"a_{abs(hash((tuple(guide), line))) % 10**6}.py", action_reward(line))
    argv = [
        "evaluate",
        ROBOT_TASK,
        f"train.output_dir={out}",
        "env.max_episode_steps=8",
        "train.torch_threads=1",
    ]
    argv += ["--policy", policy, "--episodes", "1", "--out", out / "eval.json"]
    msg = refuse([*argv, *guide, "--reward", path, "--reward-timeout", "0.5"], cause, out)
    assert Path(path).name in msg


def test_action_reward_task_timeout(refuse, tmp_path, policy):
    """Without --reward-timeout the task's reward_timeout applies, and the message names it."""
    path = script(tmp_path, "slow_action.py", action_reward("time.sleep(10)"))
    argv = ["evaluate", ROBOT_TASK, "env.max_episode_steps=8", "train.torch_threads=1", "reward_timeout=0.5"]
    refuse(
        [*argv, "--policy", policy, "--episodes", "1", "--guide", "best-of-n", "--reward", path],
        "did not return within reward_timeout=0.5 s",
    )


ACTION_SCRIPTS = {
    "exit-at-import": ("import sys\nsys.exit(3)\n", "failed to import: called sys.exit(3)"),
    "no-function": ("X = 1\n", "defines neither action_reward(obs, actions)"),
    "factory-exits": (
        "import sys\ndef make_action_reward(**kw):\n    sys.exit(1)\n",
        "failed to build: called sys.exit(1)",
    ),
    "not-a-script": (None, "unknown action reward 'jpeg_compressibility'"),
    "missing": ("", "not found"),
}


@pytest.mark.parametrize("body, cause", ACTION_SCRIPTS.values(), ids=ACTION_SCRIPTS.keys())
def test_action_reward_script(refuse, tmp_path, policy, body, cause):
    """Action reward scripts that fail before any scoring: refused before the policy loads."""
    if body is None:
        spec = "jpeg_compressibility"
    elif body == "":
        spec = str(tmp_path / "none.py")
    else:
        spec = str(tmp_path / "scripts" / f"s_{abs(hash(cause)) % 10**6}.py")
        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        Path(spec).write_text(body)
    out = tmp_path / "out"
    argv = ["evaluate", ROBOT_TASK, f"train.output_dir={out}", "--policy", policy, "--episodes", "1"]
    refuse([*argv, "--guide", "best-of-n", "--reward", spec], cause, out)


def test_action_reward_script_works(tmp_path, policy, capsys):
    """A well-behaved action reward script guides evaluation as the built-in ones do."""
    from flowrl.cli import main

    path = script(tmp_path, "fine_action.py", action_reward("pass"))
    argv = ["evaluate", ROBOT_TASK, "env.max_episode_steps=8", "train.torch_threads=1", "--policy", policy]
    assert (
        main([*argv, "--episodes", "1", "--guide", "best-of-n", "--reward", path, "--reward-timeout", "60"])
        == 0
    )
    assert "best-of-n: 1 evaluation episodes" in capsys.readouterr().out
