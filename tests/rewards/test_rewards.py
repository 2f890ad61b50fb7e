"""Built-in rewards on tiny inputs, reward scripts by path, and bad reward output."""

import textwrap

import pytest
import torch

from flowrl.rewards import Reward, RewardError, available_rewards

IMAGES = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a cat", "a dog", "a fox"]
TINY_CLIP = {"clip_model": "flowrl-tiny", "clip_pretrained": None}


def test_builtins_are_registered():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "aesthetic", "clip_score"} <= set(
        available_rewards()
    )


def test_jpeg_rewards_order_smooth_and_noisy_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    comp, _ = Reward([{"name": "jpeg_compressibility"}])(images, ["x", "y"])
    incomp, _ = Reward([{"name": "jpeg_incompressibility"}])(images, ["x", "y"])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)


@pytest.mark.parametrize("name", ["aesthetic", "clip_score"])
def test_clip_rewards_plumbing_with_random_tiny_clip(name):
    reward = Reward([{"name": name, "kwargs": TINY_CLIP}])
    assert reward.differentiable
    values, info = reward(IMAGES, PROMPTS)
    assert values.shape == (3,) and torch.isfinite(values).all()
    assert f"reward/{name}" in info
    # differentiable in the images
    x = IMAGES.clone().requires_grad_(True)
    _, _, fn = reward.terms[0]
    out, _ = fn(x, PROMPTS, [{}] * 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_aesthetic_loads_weights_file(tmp_path):
    from safetensors.torch import save_file

    from flowrl.rewards import resolve_reward

    factory, _ = resolve_reward("aesthetic")
    fn_random = factory(**TINY_CLIP)
    torch.manual_seed(3)
    import importlib

    mlp_mod = importlib.import_module(factory.__module__)
    mlp = mlp_mod.AestheticMLP(32)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(tmp_path / "mlp.safetensors"))
    fn = factory(weights=str(tmp_path / "mlp.safetensors"), **TINY_CLIP)
    a, _ = fn(IMAGES, PROMPTS, [{}] * 3)
    b, _ = fn_random(IMAGES, PROMPTS, [{}] * 3)
    assert not torch.allclose(a, b)
    with pytest.raises(FileNotFoundError, match="aesthetic weights"):
        factory(weights=str(tmp_path / "missing.pth"), **TINY_CLIP)


def test_weighted_sum(tmp_path):
    r = Reward(
        [{"name": "jpeg_compressibility", "weight": 2.0}, {"name": "jpeg_incompressibility", "weight": 0.5}]
    )
    total, info = r(IMAGES, PROMPTS)
    torch.testing.assert_close(
        total, 2.0 * info["reward/jpeg_compressibility"] + 0.5 * info["reward/jpeg_incompressibility"]
    )


def _script(tmp_path, body: str, name="my_reward.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_user_reward_script_by_path(tmp_path):
    path = _script(
        tmp_path,
        """
        import torch
        def reward_fn(images, prompts, metadata):
            return images.mean(dim=(1, 2, 3)), {"note": 1}
        """,
    )
    values, _ = Reward([{"name": path}])(IMAGES, PROMPTS)
    torch.testing.assert_close(values, IMAGES.mean(dim=(1, 2, 3)))
    factory_path = _script(
        tmp_path,
        """
        def make_reward(scale=1.0):
            def fn(images, prompts, metadata):
                return [scale * len(p) for p in prompts]
            return fn
        """,
        "factory_reward.py",
    )
    values, _ = Reward([{"name": factory_path, "kwargs": {"scale": 2.0}}])(IMAGES, PROMPTS)
    assert values.tolist() == [10.0, 10.0, 10.0]
    values, _ = Reward([{"name": f"{factory_path}:make_reward", "kwargs": {"scale": 1.0}}])(IMAGES, PROMPTS)
    assert values.tolist() == [5.0, 5.0, 5.0]


def test_example_reward_script_in_repo():
    values, _ = Reward([{"name": "rewards/brightness.py"}])(IMAGES, PROMPTS)
    torch.testing.assert_close(values, IMAGES.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "body, match",
    [
        (
            "def reward_fn(images, prompts, metadata):\n    return [float('nan')] * len(prompts)\n",
            "non-finite",
        ),
        ("def reward_fn(images, prompts, metadata):\n    return [1.0, 2.0]\n", r"shape \(2,\).*\(3,\)"),
        (
            "def reward_fn(images, prompts, metadata):\n    raise RuntimeError('scorer crashed')\n",
            "raised RuntimeError: scorer crashed",
        ),
        ("def reward_fn(images, prompts, metadata):\n    return 'high'\n", "not numbers"),
    ],
)
def test_bad_reward_output_names_the_reward(tmp_path, body, match):
    path = _script(tmp_path, body, "bad_reward.py")
    with pytest.raises(RewardError, match=match) as err:
        Reward([{"name": path}])(IMAGES, PROMPTS)
    assert "bad_reward.py" in str(err.value)


def test_unknown_reward_suggests_a_name(tmp_path):
    with pytest.raises(KeyError, match="jpeg_compressibility"):
        Reward([{"name": "jpeg_compresibility"}])
    with pytest.raises(FileNotFoundError, match="not found"):
        Reward([{"name": str(tmp_path / "nope.py")}])


def test_async_submit_matches_sync():
    r = Reward([{"name": "jpeg_compressibility"}])
    fut = r.submit(IMAGES, PROMPTS)
    torch.testing.assert_close(fut.result()[0], r(IMAGES, PROMPTS)[0])
    r.close()


def test_pickscore_with_a_tiny_local_clip_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from flowrl.models.tokenizer import offline_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "pick")
    offline_clip_tokenizer().save_pretrained(tmp_path / "pick")
    reward = Reward([{"name": "pickscore", "kwargs": {"model": str(tmp_path / "pick"), "processor": None}}])
    values, _ = reward(IMAGES, PROMPTS)
    assert values.shape == (3,) and torch.isfinite(values).all() and reward.differentiable


def test_hpsv2_loads_an_open_clip_state_dict(tmp_path):
    from flowrl.rewards.clip import load_open_clip

    clip, *_ = load_open_clip("flowrl-tiny", None)
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "hps.pt")
    values, _ = Reward(
        [{"name": "hpsv2", "kwargs": {"weights": str(tmp_path / "hps.pt"), "clip_model": "flowrl-tiny"}}]
    )(IMAGES, PROMPTS)
    expected, _ = Reward([{"name": "clip_score", "kwargs": TINY_CLIP}])(IMAGES, PROMPTS)
    torch.testing.assert_close(values, expected)
    with pytest.raises(FileNotFoundError, match="hpsv2 weights"):
        Reward([{"name": "hpsv2", "kwargs": {"weights": str(tmp_path / "missing.pt")}}])
