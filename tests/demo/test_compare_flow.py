"""examples/compare_flow.py, the flow-model learning-efficiency benchmark: its table (equal
queries, equal seconds, time to Flow-GRPO's final evaluation reward as a ratio) from curves written
here, through ``--replot``; and, slow, one epoch of two methods end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.efficiency import at, first_reach

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("compare_flow", REPO / "examples" / "compare_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_and_replot(tmp_path):
    cf = _module()
    curves = {
        # Flow-GRPO: final eval -1.20, first reached at 30 s (its last epoch)
        "flow_grpo": {"queries": [0, 16, 32], "seconds": [0.0, 10.0, 30.0], "reward": [None, -1.3, -1.25],
                      "eval": [-1.30, -1.25, -1.20]},
        # reaches -1.20 at 16 queries and 5 s: 5 / 30 of Flow-GRPO's time
        "nft": {"queries": [0, 16, 32], "seconds": [0.0, 5.0, 9.0], "reward": [None, -1.2, -1.1],
                "eval": [-1.30, -1.19, -1.15]},
        "fpo": {"queries": [0, 16, 32], "seconds": [0.0, 4.0, 8.0], "reward": [None, -1.3, -1.3],
                "eval": [-1.30, -1.29, -1.28]},
    }  # fmt: skip
    assert first_reach(curves["nft"], "eval", -1.20) == 5.0
    assert first_reach(curves["nft"], "eval", -1.20, "queries") == 16
    assert first_reach(curves["fpo"], "eval", -1.20) is None
    assert at(curves["flow_grpo"], "eval", "seconds", 8.0) == -1.30  # the last evaluation at or before 8 s
    (tmp_path / "results.json").write_text(json.dumps(curves))
    assert cf.main(["--replot", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in table.splitlines()
        if line.startswith("| ")
    }
    assert rows["nft"][-1].strip(" |") == f"{5 / 30:.2f}" and rows["flow_grpo"][-1].strip(" |") == "1.00"
    assert rows["fpo"][-1].strip(" |") == "not reached"
    assert "at 32 queries" in table and "at 8 s" in table and "(the target): -1.2000" in table
    assert (tmp_path / "compare_flow.png").stat().st_size > 1000


@pytest.mark.slow
def test_compare_flow_example_runs(tmp_path):
    """One epoch (16 reward queries) of Flow-GRPO and DiffusionNFT on the tiny flow model."""
    out = tmp_path / "cf"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "compare_flow.py"),
            *("--methods", "flow_grpo", "nft", "--queries", "16", "--eval-prompts", "2"),
            *("--quiet", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for curve in results.values():
        assert curve["queries"] == [0, 16] and len(curve["eval"]) == len(curve["seconds"]) == 2
    assert "time / Flow-GRPO's" in (out / "table.md").read_text()
