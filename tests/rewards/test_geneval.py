"""The GenEval-style reward: its decision rules on hand-made detections (GenEval's counting,
colour and position tests; Flow-GRPO's fractional score), and the plumbing with tiny random
OWL-ViT / OWLv2 and CLIP models built from configs."""

import numpy as np
import pytest
import torch

from flowrl.rewards import Reward, RewardError
from flowrl.rewards.geneval import (
    box_iou,
    flow_grpo_score,
    geneval_correct,
    keep_detections,
    relative_position,
)


def no_colors(cls, boxes):
    raise AssertionError("no colour asked")


def colors(*names):
    return lambda cls, boxes: list(names[: len(boxes)])


def test_keep_detections_threshold_order_cap_and_nms():
    a, b, c = (0, 0, 9, 9), (1, 0, 10, 9), (50, 50, 59, 59)
    found = [(c, 0.5), (a, 0.9), (b, 0.8), ((0, 0, 1, 1), 0.2)]
    assert keep_detections(found, 0.3) == [a, b, c]  # best first; 0.2 is under the threshold
    assert keep_detections(found, 0.3, max_objects=2) == [a, b]
    # a and b overlap at IoU 90/110 (GenEval's pixel-inclusive areas: 10 x 10 each, 9 x 10 shared)
    assert box_iou(a, b) == pytest.approx(90 / 110)
    assert keep_detections(found, 0.3, max_overlap=0.5) == [a, c]


def test_relative_position_by_box_centres():
    cat, dog = (0, 0, 10, 10), (100, 0, 110, 10)
    assert relative_position(cat, dog) == {"left of"} and relative_position(dog, cat) == {"right of"}
    assert relative_position((0, 100, 10, 110), cat) == {"below"}
    # a diagonal offset (-100, -100): both components -0.707 after the (small) shrink
    assert relative_position(cat, (100, 100, 110, 110)) == {"left of", "above"}
    # offset 5 px against 0.1 x (50 + 50) px of widths: shrunk to nothing, no relation
    assert relative_position((0, 0, 50, 50), (5, 0, 55, 50)) == set()
    # offset 20 px shrunk by 10 px to 10 px: 10 / 20 = 0.5 is not past 0.5; 30 px: 20 / 30 is
    assert relative_position((0, 0, 50, 50), (20, 0, 70, 50)) == set()
    assert relative_position((0, 0, 50, 50), (30, 0, 80, 50)) == {"left of"}


COUNT3 = {
    "tag": "counting",
    "include": [{"class": "cup", "count": 3}],
    "exclude": [{"class": "cup", "count": 4}],
}


def _boxes(n, x0=0):
    return [(x0 + 20 * i, 0, x0 + 20 * i + 10, 10) for i in range(n)]


def test_counting():
    assert geneval_correct({"cup": _boxes(3)}, COUNT3, no_colors)[0]
    assert not geneval_correct({"cup": _boxes(4)}, COUNT3, no_colors)[0]  # the exclude clause
    assert not geneval_correct({"cup": _boxes(2)}, COUNT3, no_colors)[0]
    # GenEval without an exclude clause: at least `count`; Flow-GRPO's strict: exactly
    two = {"tag": "counting", "include": [{"class": "cup", "count": 2}]}
    assert geneval_correct({"cup": _boxes(3)}, two, no_colors)[0]
    assert flow_grpo_score({"cup": _boxes(3)}, two, no_colors) == (False, 0.5)  # 1 - |2 - 3| / 2
    assert flow_grpo_score({"cup": _boxes(3)}, COUNT3, no_colors) == (True, 1.0)
    assert flow_grpo_score({"cup": _boxes(2)}, COUNT3, no_colors) == (False, pytest.approx(2 / 3))
    assert flow_grpo_score({}, COUNT3, no_colors) == (False, 0.0)
    # over twice the count goes below 0, as the reference's 1 - |count - found| / count does
    assert flow_grpo_score({"cup": _boxes(5)}, two, no_colors) == (False, -0.5)


def test_colours_are_judged_on_the_most_confident_boxes():
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert geneval_correct({"car": _boxes(1)}, red_car, colors("red"))[0]
    assert not geneval_correct({"car": _boxes(1)}, red_car, colors("blue"))[0]
    # GenEval looks at the first `count` boxes only; Flow-GRPO needs the exact count first
    assert geneval_correct({"car": _boxes(2)}, red_car, colors("red", "blue"))[0]
    assert flow_grpo_score({"car": _boxes(2)}, red_car, colors("red", "blue")) == (False, 0.0)  # (0 + 0) / 2
    assert flow_grpo_score({"car": _boxes(1)}, red_car, colors("blue")) == (False, 0.5)  # (1 + 0) / 2
    assert flow_grpo_score({"car": _boxes(1)}, red_car, colors("red")) == (True, 1.0)


CAT_LEFT_OF_DOG = {
    "tag": "position",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
}


def test_positions():
    dog, left, right = [(100, 0, 110, 10)], [(0, 0, 10, 10)], [(200, 0, 210, 10)]
    assert geneval_correct({"dog": dog, "cat": left}, CAT_LEFT_OF_DOG, no_colors)[0]
    assert not geneval_correct({"dog": dog, "cat": right}, CAT_LEFT_OF_DOG, no_colors)[0]
    ok, reasons = geneval_correct({"cat": left}, CAT_LEFT_OF_DOG, no_colors)  # no dog: no target
    assert not ok and reasons == ["expected dog>=1, found 0", "no target for cat to be left of"]
    # Flow-GRPO's terms: dog count 1, cat count 1, position 1 -> 1.0
    assert flow_grpo_score({"dog": dog, "cat": left}, CAT_LEFT_OF_DOG, no_colors) == (True, 1.0)
    # wrong side: its reference appends 0 for the failed pair and then 1: (1 + 1 + 0 + 1) / 4
    assert flow_grpo_score({"dog": dog, "cat": right}, CAT_LEFT_OF_DOG, no_colors) == (False, 0.75)
    # no dog: dog count 0, cat count 1, no target 0 -> 1 / 3
    assert flow_grpo_score({"cat": left}, CAT_LEFT_OF_DOG, no_colors) == (False, pytest.approx(1 / 3))


# ---------------------------------------------------------------------- tiny models
TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPModel,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    from flowrl.models.tokenizer import offline_clip_tokenizer

    root = tmp_path_factory.mktemp("geneval")
    size = {"height": 32, "width": 32}
    owl_text = {**TEXT, "max_position_embeddings": 16}
    for name, config, model, processor, images in [
        (
            "owlvit",
            OwlViTConfig,
            OwlViTForObjectDetection,
            OwlViTProcessor,
            OwlViTImageProcessor(size=size, crop_size=size),
        ),
        ("owlv2", Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor, Owlv2ImageProcessor(size=size)),
    ]:
        torch.manual_seed(0)  # the class head maps into the text width: projection_dim = text hidden_size
        model(config(text_config=owl_text, vision_config=VISION, projection_dim=32)).save_pretrained(
            root / name
        )
        processor(image_processor=images, tokenizer=offline_clip_tokenizer(16)).save_pretrained(root / name)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)).save_pretrained(
        root / "clip"
    )
    offline_clip_tokenizer().save_pretrained(root / "clip")
    return root


def test_owl_boxes_match_transformers_post_processing(tiny_models):
    from transformers import AutoProcessor, OwlViTForObjectDetection

    from flowrl.rewards.geneval import OwlDetector

    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # H 24, W 40
    found = OwlDetector(str(tiny_models / "owlvit"), "cpu")([image], ["cat", "dog"])[0]
    processor = AutoProcessor.from_pretrained(tiny_models / "owlvit")
    model = OwlViTForObjectDetection.from_pretrained(tiny_models / "owlvit").eval()
    with torch.no_grad():
        out = model(**processor(text=[["cat", "dog"]], images=[image], return_tensors="pt"))
    ref = processor.image_processor.post_process_object_detection(
        out, threshold=0.0, target_sizes=[(24, 40)]
    )[0]
    mine = sorted((s, q, b) for q, d in found.items() for b, s in d)
    theirs = sorted(
        (s, ["cat", "dog"][q], tuple(b))
        for s, q, b in zip(ref["scores"].tolist(), ref["labels"].tolist(), ref["boxes"].clamp(min=0).tolist())
    )
    assert len(mine) == len(theirs) == out.logits.shape[1]
    for (s, q, b), (s2, q2, b2) in zip(mine, theirs):
        assert q == q2 and s == pytest.approx(s2, abs=1e-6)
        assert np.allclose(np.minimum(b2, [40, 24, 40, 24]), b, atol=1e-4)


GENEVAL_ROWS = [
    {"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"},
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    },
    {
        "tag": "position",
        "prompt": "a photo of a cat left of a dog",
        **{"include": CAT_LEFT_OF_DOG["include"]},
    },
]


@pytest.mark.parametrize("detector, score", [("owlvit", "fractional"), ("owlv2", "strict")])
def test_geneval_reward_plumbing_with_tiny_models(tiny_models, detector, score):
    prompts = [r["prompt"] for r in GENEVAL_ROWS]
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = {
        "detector": str(tiny_models / detector),
        "clip": str(tiny_models / "clip"),
        "score": score,
        "threshold": 0.5,
        "vocabulary": ["bench"],  # besides the prompts' own classes (the default: GenEval's 80)
    }
    reward = Reward([{"name": "geneval", "kwargs": kwargs}])
    values, info = reward(images, prompts, GENEVAL_ROWS)
    assert (
        values.shape == (3,) and torch.isfinite(values).all() and (values <= 1).all()
    )  # fractional: may be < 0
    if score == "strict":
        assert set(values.tolist()) <= {0.0, 1.0}
    assert any(k.endswith("geneval/strict_accuracy") for k in info)  # the batch's accuracies, logged
    with pytest.raises(RewardError, match="has no GenEval metadata"):
        reward(images, prompts, [{} for _ in prompts])


def test_clip_colours_of_crops_and_the_default_vocabulary(tiny_models):
    from flowrl.rewards.geneval import COLORS, ClipColors, _vocabulary

    clf = ClipColors(str(tiny_models / "clip"), "cpu")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = clf(image, "car", [(0.0, 0.0, 10.5, 12.0), (30.0, 30.0, 32.0, 32.0)])  # the second at the edge
    assert len(names) == 2 and set(names) <= set(COLORS)
    w = clf.classifier("car")  # normalized means of normalized template embeddings, one row per colour
    assert w.shape[0] == len(COLORS) and torch.allclose(w.norm(dim=-1), torch.ones(len(COLORS)))
    vocab = _vocabulary("geneval")
    assert len(vocab) == 80 and vocab[0] == "person" and "wine glass" in vocab


def test_flow_grpo_geneval_task_file(tmp_path):
    """tasks/flow_grpo_geneval_sd3.yaml: Flow-GRPO's objective with the geneval reward on its
    GenEval folder's train split, evaluated on the test split 14 prompts a batch."""
    import json

    from flowrl.config import load_config
    from flowrl.data.prompts import load_eval_prompt_data, load_prompt_data

    folder = tmp_path / "geneval"
    folder.mkdir()
    for split, rows in [("train", GENEVAL_ROWS[:2]), ("test", GENEVAL_ROWS[2:])]:
        (folder / f"{split}_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("tasks/flow_grpo_geneval_sd3.yaml", [f"train.prompts={folder}"])
    assert [r.name for r in cfg.rewards] == ["geneval"] and cfg.rewards[0].kwargs["score"] == "fractional"
    assert cfg.algorithm.name == "grpo" and cfg.train.eval_batch_size == 14
    assert load_prompt_data(cfg.train.prompts).metadata == GENEVAL_ROWS[:2]
    assert load_eval_prompt_data(cfg.train.eval_prompts, cfg.train.prompts).metadata == GENEVAL_ROWS[2:]
