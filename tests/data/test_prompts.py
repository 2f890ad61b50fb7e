"""Prompt data: files, JSONL metadata, Flow-GRPO split folders, DDPO's sets; the metadata reaches
the reward in training, evaluation and guided sampling; prompt draws repeat exactly on resume."""

import json
from pathlib import Path

import pytest

from flowrl.config import load_config
from flowrl.data.prompts import (
    WithPromptMetadata,
    load_eval_prompt_data,
    load_prompt_data,
    load_prompts,
)
from flowrl.errors import ConfigError, InputError, MissingFileError
from flowrl.run import Run

REPO = Path(__file__).resolve().parents[2]

# Flow-GRPO's dataset/geneval/<split>_metadata.jsonl format (GenEval's evaluation_metadata.jsonl)
GENEVAL_TRAIN = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "cup", "count": 3}],
        "exclude": [{"class": "cup", "count": 4}],
        "prompt": "a photo of three cups",
    },
    {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a cat left of a dog",
    },
]
GENEVAL_TEST = [
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
        "split": "test",
    },
    {
        "tag": "two_object",
        "include": [{"class": "apple", "count": 1}, {"class": "clock", "count": 1}],
        "prompt": "a photo of an apple and a clock",
        "split": "test",
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def geneval_dir(tmp_path) -> Path:
    folder = tmp_path / "geneval"
    folder.mkdir()
    _write_jsonl(folder / "train_metadata.jsonl", GENEVAL_TRAIN)
    _write_jsonl(folder / "test_metadata.jsonl", GENEVAL_TEST)
    return folder


def test_geneval_metadata_files_load_as_they_are(geneval_dir):
    data = load_prompt_data(str(geneval_dir / "train_metadata.jsonl"))
    assert data.prompts == [r["prompt"] for r in GENEVAL_TRAIN]
    assert data.metadata == GENEVAL_TRAIN  # the whole line, as Flow-GRPO's GenevalPromptDataset passes it
    assert load_prompt_data(str(geneval_dir)).metadata == GENEVAL_TRAIN  # a folder: its train split
    test = load_eval_prompt_data("test", str(geneval_dir))
    assert test.prompts == [r["prompt"] for r in GENEVAL_TEST] and test.metadata == GENEVAL_TEST
    assert load_eval_prompt_data(str(geneval_dir), "colors").metadata == GENEVAL_TEST
    # the default: the first 8 training prompts, with their metadata
    assert load_eval_prompt_data(None, str(geneval_dir)).metadata == GENEVAL_TRAIN


def test_text_split_folders_and_files(tmp_path):
    ocr = tmp_path / "ocr"  # Flow-GRPO's dataset/ocr: train.txt / test.txt, no metadata
    ocr.mkdir()
    (ocr / "train.txt").write_text('a sign that says "open"\n\n# a comment\na mug that says "hi"\n')
    (ocr / "test.txt").write_text('a banner that says "flowrl"\n')
    assert load_prompt_data(str(ocr)).prompts == ['a sign that says "open"', 'a mug that says "hi"']
    assert load_prompt_data(str(ocr)).metadata == [{}, {}]
    assert load_eval_prompt_data("test", str(ocr)).prompts == ['a banner that says "flowrl"']
    assert load_prompts(str(ocr / "test.txt")) == ['a banner that says "flowrl"']
    inline = load_prompt_data(["a cat", {"prompt": "a dog", "label": 3}])
    assert inline.prompts == ["a cat", "a dog"] and inline.metadata == [{}, {"prompt": "a dog", "label": 3}]


def test_ddpo_prompt_sets():
    animals = load_prompts("imagenet_animals")
    assert len(animals) == 398 and animals[0] == "tench, Tinca tinca"
    dogs = load_prompts("imagenet_dogs")
    assert len(dogs) == 118 and dogs[0] == "Chihuahua" and dogs == animals[151:269]
    assert len(load_prompts("ddpo_simple_animals")) == 45
    pairs = load_prompts("nouns_activities")
    assert len(pairs) == 45 * 3 and "an ant riding a bike" in pairs and "a cat playing chess" in pairs


def test_bad_prompt_data_names_the_cause(tmp_path, geneval_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    with pytest.raises(InputError, match=r"line 2 has no \"prompt\" string"):
        load_prompt_data(str(bad))
    bad.write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_prompt_data(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        MissingFileError, match="no train split.*train_metadata.jsonl, train.jsonl, train.txt"
    ):
        load_prompt_data(str(empty))
    with pytest.raises(ConfigError, match="eval_prompts=test.*not a folder"):
        load_eval_prompt_data("test", "colors")
    with pytest.raises(ConfigError, match=r"train.prompts\[0\] has no 'prompt'"):
        load_prompt_data([{"label": 1}])


def test_guidance_reward_gets_metadata_by_prompt():
    seen = []

    class Recorder:
        terms = [("rec", 1.0, None)]

        def __call__(self, images, prompts, metadata=None):
            seen.append(metadata)
            return [0.0] * len(prompts), {}

    reward = WithPromptMetadata(Recorder(), ["a", "b"], [{"k": 1}, {"k": 2}])
    reward(None, ["b", "b", "a"])
    assert seen == [[{"k": 2}, {"k": 2}, {"k": 1}]]
    with pytest.raises(ConfigError, match="appears twice with different metadata"):
        WithPromptMetadata(Recorder(), ["a", "a"], [{"k": 1}, {"k": 2}])


RECORDER = """
import json

def make_reward(log):
    def reward_fn(images, prompts, metadata):
        assert len(metadata) == len(prompts)
        with open(log, "a") as f:
            f.write(json.dumps({"prompts": prompts, "metadata": metadata}) + "\\n")
        return images.float().mean(dim=(1, 2, 3)), {}
    return reward_fn
"""

SMALL = [
    "model.finetune=full",
    "sampler.num_steps=1",
    "train.sample_batch_size=4",
    "train.num_batches_per_epoch=1",
    "train.minibatch_size=4",
    "train.eval_every=0",
    "train.save_every=1",
    "train.async_reward=false",
    "algorithm.group_size=2",
    "algorithm.name=grpo",
    "model.tiny_image_size=8",
]


def _calls(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The recorded (training, evaluation) reward calls."""
    train = [r for r in rows if not any(m.get("split") == "test" for m in r["metadata"])]
    return train, [r for r in rows if r not in train]


def _run(tmp_path, geneval_dir, name: str, *extra: str) -> list[dict]:
    """Train, and return every reward call so far (prompts and metadata, in order)."""
    script, log = tmp_path / "recorder.py", tmp_path / "calls.jsonl"
    script.write_text(RECORDER)
    cfg = load_config(
        str(REPO / "tasks/jpeg_tiny.yaml"),
        [
            *SMALL,
            f"rewards.0.name={script}",
            f"rewards.0.kwargs={{log: {log}}}",
            f"train.prompts={geneval_dir}",
            "train.eval_prompts=test",
            "train.eval_batch_size=1",  # the test split sampled and scored a prompt at a time
            "train.num_epochs=2",
            f"train.output_dir={tmp_path}",
            f"train.run_name={name}",
            *extra,
        ],
    )
    Run(cfg, name).train()
    return [json.loads(ln) for ln in log.read_text().splitlines()]


def test_metadata_reaches_the_reward_and_draws_repeat_on_resume(tmp_path, geneval_dir):
    calls = _run(tmp_path, geneval_dir, "whole")
    train, evals = _calls(calls)
    assert len(train) == 2 and len(evals) == 4  # 2 epochs; evaluated before and after, 1 prompt a batch
    by_prompt = {r["prompt"]: r for r in GENEVAL_TRAIN}
    for call in train:  # each prompt's own metadata line, the group's 2 samples alike
        assert call["metadata"] == [by_prompt[p] for p in call["prompts"]]
        assert call["prompts"][0::2] == call["prompts"][1::2]
    assert [m for e in evals for m in e["metadata"]] == GENEVAL_TEST * 2  # the test split, its metadata

    # resumed from the whole run's first checkpoint, epoch 1 draws what the whole run drew
    resumed = _run(
        tmp_path, geneval_dir, "resumed", f"train.resume={tmp_path / 'whole/checkpoints/epoch_000001'}"
    )
    assert _calls(resumed[len(calls) :])[0] == train[1:]


def test_sample_guided_by_a_reward_that_reads_the_prompts_file_metadata(tmp_path):
    from flowrl.cli import main

    prompts = _write_jsonl(tmp_path / "p.jsonl", GENEVAL_TRAIN[:2])
    log, script = tmp_path / "calls.jsonl", tmp_path / "recorder.py"
    script.write_text(RECORDER)
    argv = ["sample", "--model", "tiny", "--tiny-image-size", "8", "--num-steps", "2", "-n", "2"]
    argv += ["--prompts-file", str(prompts), "--out", str(tmp_path / "out"), "--guide", "best-of-n"]
    argv += ["--particles", "2", "--reward", str(script), "--reward-kwargs", json.dumps({"log": str(log)})]
    assert main(argv) == 0
    by_prompt = {r["prompt"]: r for r in GENEVAL_TRAIN}
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert calls and all(c["metadata"] == [by_prompt[p] for p in c["prompts"]] for c in calls)
    assert {p for c in calls for p in c["prompts"]} == set(by_prompt) - {GENEVAL_TRAIN[2]["prompt"]}
