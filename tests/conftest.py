import copy
import os
from pathlib import Path

import pytest
import torch

# One torch thread per pytest-xdist worker (scripts/test.sh runs one per core), 2 in a lone process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run with train.torch_threads (the bad-input corpus uses 1) sets the process's thread count:
    put it back, so every test runs as it does alone."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _tiny_pipes():
    from flowrl.models.sd import build_tiny_sd_pipeline

    return {pt: build_tiny_sd_pipeline(prediction_type=pt) for pt in ("epsilon", "v_prediction")}


@pytest.fixture
def tiny_pipe(_tiny_pipes):
    """A fresh copy of the tiny epsilon-prediction SD pipeline (tests may add adapters to it)."""
    return copy.deepcopy(_tiny_pipes["epsilon"])


@pytest.fixture
def tiny_pipe_v(_tiny_pipes):
    return copy.deepcopy(_tiny_pipes["v_prediction"])


def perturb_lora(adapter, scale: float = 0.05, seed: int = 0) -> None:
    """Give the LoRA B matrices (zero at init) random values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter.denoiser.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def digits_alignment_gains(task: str, out, *overrides: str, epochs: int | None = None):
    """Train ``task`` (a name under tasks/ or a task file's path) for ``epochs`` epochs (None: the
    file's own) and return ``(before, after, run)``: the deterministic-DDIM alignment of 10 samples
    per digit on the 4 fixed evaluation seeds 1000-1003 before and after, and the trained run (the
    project's learning-test protocol: the untrained seed-to-seed std is 0.043, a 4-seed mean's 0.021)."""
    from flowrl.config import load_config, tasks_dir
    from flowrl.demo.quickstart import measure_alignment
    from flowrl.run import Run

    path = task if task.endswith(".yaml") else str(tasks_dir() / f"{task}.yaml")
    extra = [] if epochs is None else [f"train.num_epochs={epochs}"]
    cfg = load_config(
        path, [*extra, f"train.output_dir={out}", "train.eval_every=0", "train.save_every=0", *overrides]
    )
    run = Run(cfg, Path(path).stem, progress=False)

    def alignment() -> list[float]:
        sc = run.adapter.scheduler_config
        return [measure_alignment(run.adapter, sc, 10, 0.0, 10, s)["alignment"] for s in range(1000, 1004)]

    before = alignment()
    run.train()
    return before, alignment(), run
