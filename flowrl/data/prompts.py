"""Prompt data: prompts with per-prompt metadata, by name, from a file, or from a split folder.

Every source gives a :class:`PromptData`, B prompts and B metadata dicts; the metadata reaches
every reward as its third argument (``reward_fn(images, prompts, metadata)``):

    a list           train.prompts='[a cat, a dog]', or items {prompt: ..., any: fields}
    a named set      simple_animals, colors (inline); DDPO's imagenet_animals, imagenet_dogs,
                     ddpo_simple_animals, nouns_activities (flowrl/data/assets, from ddpo-pytorch)
    a text file      one prompt per line, # comments; metadata {}
    a JSONL file     one JSON object per line with a "prompt" string plus any fields; the whole
                     object is the prompt's metadata (Flow-GRPO's GenEval files load as they are:
                     {"tag", "include", "exclude", "prompt"})
    a folder         a split folder as Flow-GRPO lays out its datasets: <split>_metadata.jsonl
                     (dataset/geneval), <split>.jsonl, or <split>.txt (dataset/ocr, pickscore);
                     train.prompts reads the train split, train.eval_prompts the test split

``train.eval_prompts: test`` evaluates on the test split of the ``train.prompts`` folder.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from flowrl.errors import ConfigError, InputError, MissingFileError, read_text

ASSETS = Path(__file__).resolve().parent / "assets"

PROMPT_SETS: dict[str, list[str]] = {
    # DDPO's "simple_animals" style set, shortened (the full 45: ddpo_simple_animals)
    "simple_animals": [
        "a cat",
        "a dog",
        "a horse",
        "a monkey",
        "a rabbit",
        "a zebra",
        "a spider",
        "a bird",
        "a sheep",
        "a deer",
        "a cow",
        "a goat",
        "a lion",
        "a tiger",
        "a bear",
        "a raccoon",
        "a fox",
        "a wolf",
        "a lizard",
        "a beetle",
        "an ant",
        "a butterfly",
        "a fish",
        "a shark",
    ],
    "colors": ["a red square", "a green square", "a blue square", "a yellow square"],
}

# ddpo-pytorch's prompt functions (ddpo_pytorch/prompts.py) as finite sets: DDPO draws uniformly
# from the same lists (nouns_activities: a noun and an activity independently, i.e. uniformly
# over their product)
ASSET_SETS = ("imagenet_animals", "imagenet_dogs", "ddpo_simple_animals", "nouns_activities")
SPLIT_FILES = ("{split}_metadata.jsonl", "{split}.jsonl", "{split}.txt")


@dataclass(frozen=True)
class PromptData:
    """B prompts and their B metadata dicts (``{}`` where the source has none)."""

    prompts: list[str]
    metadata: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, idx) -> tuple[list[str], list[dict]]:
        """The prompts at ``idx`` and copies of their metadata (a reward that edits its metadata
        cannot change later draws)."""
        return [self.prompts[i] for i in idx], [copy.deepcopy(self.metadata[i]) for i in idx]

    def head(self, n: int) -> PromptData:
        return PromptData(self.prompts[:n], self.metadata[:n], self.source)


def _lines(path: Path, what: str) -> list[str]:
    text = read_text(path, what)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _article(noun: str) -> str:
    """inflect's ``a``/``an`` for DDPO's animal nouns (only ``ant`` opens with a vowel there)."""
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _asset_set(name: str) -> list[str]:
    what = "flowrl's prompt asset"
    if name == "nouns_activities":
        nouns, acts = _lines(ASSETS / "simple_animals.txt", what), _lines(ASSETS / "activities.txt", what)
        return [f"{_article(n)} {a}" for n in nouns for a in acts]
    if name == "ddpo_simple_animals":
        return _lines(ASSETS / "simple_animals.txt", what)
    animals = _lines(ASSETS / "imagenet_animals.txt", what)  # ImageNet classes 0-397
    return animals if name == "imagenet_animals" else animals[151:269]


def _read_jsonl(path: Path, what: str) -> tuple[list[str], list[dict]]:
    prompts, metadata = [], []
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{what} {path} line {n} is not JSON ({e.msg}); write one JSON object per line"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(
                f'{what} {path} line {n} has no "prompt" string; each line is an object like '
                '{"prompt": "a photo of a cat", ...metadata fields}'
            )
        prompts.append(row["prompt"])
        metadata.append(row)
    return prompts, metadata


def _read_file(path: Path, what: str) -> tuple[list[str], list[dict]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, what)
    prompts = _lines(path, what)
    return prompts, [{} for _ in prompts]


def split_file(folder: Path, split: str, what: str) -> Path:
    """The file of ``split`` in a Flow-GRPO style dataset folder."""
    for pattern in SPLIT_FILES:
        path = folder / pattern.format(split=split)
        if path.is_file():
            return path
    names = ", ".join(p.format(split=split) for p in SPLIT_FILES)
    raise MissingFileError(
        f"{what}: the folder {folder} has no {split} split (looked for {names}); add one of those files, "
        "or give a file instead of the folder"
    )


def load_prompt_data(spec, what: str = "train.prompts", split: str = "train") -> PromptData:
    """Prompt data from a list, a named set, a text or JSONL file, or a split folder (``split``)."""
    if isinstance(spec, list):
        prompts, metadata = [], []
        for i, item in enumerate(spec):
            if isinstance(item, dict):
                if not isinstance(item.get("prompt"), str):
                    raise ConfigError(
                        f"{what}[{i}] has no 'prompt' string: give {{prompt: ..., other: fields}} or a plain string"
                    )
                prompts.append(item["prompt"])
                metadata.append(dict(item))
            else:
                prompts.append(str(item))
                metadata.append({})
        source = what
    elif isinstance(spec, str) and spec in PROMPT_SETS:
        prompts, source = list(PROMPT_SETS[spec]), f"prompt set {spec!r}"
        metadata = [{} for _ in prompts]
    elif isinstance(spec, str) and spec in ASSET_SETS:
        prompts, source = _asset_set(spec), f"prompt set {spec!r}"
        metadata = [{} for _ in prompts]
    elif isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.is_dir():
            path = split_file(path, split, what)
        elif not path.is_file():
            names = ", ".join([*PROMPT_SETS, *ASSET_SETS])
            raise MissingFileError(
                f"{what}: {spec!r} is neither a prompt set ({names}) nor an existing file or folder; "
                "give one of those names, a list, a text file with one prompt per line, a JSONL file, "
                "or a folder with train/test splits"
            )
        prompts, metadata = _read_file(path, f"{what}: prompt file")
        source = f"prompt file {path}"
    else:
        raise ConfigError(
            f"{what}: expected a list, a prompt-set name, a file or a folder, got {spec!r}; "
            "e.g. train.prompts=simple_animals or train.prompts='[a cat, a dog]'"
        )
    if not prompts:
        raise ConfigError(f"{source} has no prompts: add at least one (one per line in a file)")
    return PromptData(prompts, metadata, source)


def load_prompts(spec) -> list[str]:
    """The prompts alone (see :func:`load_prompt_data`)."""
    return load_prompt_data(spec).prompts


def load_eval_prompt_data(spec, train_spec, train: PromptData | None = None, count: int = 8) -> PromptData:
    """``train.eval_prompts``: null -> the first ``count`` training prompts; ``test`` -> the test split
    of the ``train.prompts`` folder; a folder -> its test split; else as :func:`load_prompt_data`."""
    what = "train.eval_prompts"
    if spec is None:
        return (train or load_prompt_data(train_spec)).head(count)
    if spec == "test":
        folder = Path(str(train_spec)).expanduser() if isinstance(train_spec, str) else None
        if folder is None or not folder.is_dir():
            raise ConfigError(
                f"{what}=test takes the test split of the train.prompts folder, but train.prompts is "
                f"{train_spec!r}, not a folder; give train.prompts a split folder, or eval_prompts a file or list"
            )
        return load_prompt_data(str(folder), what, split="test")
    return load_prompt_data(spec, what, split="test")


class WithPromptMetadata:
    """A :class:`~flowrl.rewards.Reward` that looks each prompt's metadata up by its text, for
    callers that repeat or reorder prompts and pass none (the guidance methods)."""

    def __init__(self, reward, prompts: list[str], metadata: list[dict]):
        table: dict[str, dict] = {}
        for p, m in zip(prompts, metadata):
            if table.setdefault(p, m) != m:
                raise ConfigError(
                    f"the prompt {p!r} appears twice with different metadata; guidance finds a prompt's "
                    "metadata by its text: keep one line per prompt"
                )
        self.reward, self.table, self.terms = reward, table, reward.terms

    def __call__(self, images, prompts: list[str], metadata: list[dict] | None = None):
        if metadata is None:
            metadata = [copy.deepcopy(self.table.get(p, {})) for p in prompts]
        return self.reward(images, prompts, metadata)

    def close(self) -> None:
        self.reward.close()
