"""Prompt sets by name, or from a file with one prompt per line."""

from __future__ import annotations

from pathlib import Path

from flowrl.errors import ConfigError, MissingFileError, read_text

PROMPT_SETS: dict[str, list[str]] = {
    # DDPO's "simple_animals" style set, shortened
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


def load_prompts(spec) -> list[str]:
    """A list of prompts from a list, a named set, or a text file (one per line, # comments)."""
    if isinstance(spec, list):
        prompts = [str(p) for p in spec]
        source = "train.prompts"
    elif isinstance(spec, str) and spec in PROMPT_SETS:
        prompts, source = PROMPT_SETS[spec], f"prompt set {spec!r}"
    elif isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MissingFileError(
                f"train.prompts: {spec!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor an existing file; "
                "give one of those names, a list, or the path of a text file with one prompt per line"
            )
        prompts = [
            ln.strip()
            for ln in read_text(path, "train.prompts: prompt file").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
        source = f"prompt file {path}"
    else:
        raise ConfigError(
            f"train.prompts: expected a list, a prompt-set name or a file path, got {spec!r}; "
            "e.g. train.prompts=simple_animals or train.prompts='[a cat, a dog]'"
        )
    if not prompts:
        raise ConfigError(f"{source} has no prompts: add at least one (one per line in a file)")
    return prompts
