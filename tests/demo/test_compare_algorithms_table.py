"""examples/compare_algorithms.py's table through ``--replot``, written out by hand for three
curves: the offline method (DPO, a fixed pairs file) is left out of the common queries and
seconds but still gets its time to DDPO's final alignment."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_table_by_hand(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "compare_algorithms", REPO / "examples" / "compare_algorithms.py"
    )
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    curves = {
        "ddpo": {"queries": [0, 64, 128], "seconds": [0.0, 10.0, 20.0], "reward": [None, 0.6, 0.7],
                 "alignment": [0.5, 0.6, 0.7]},
        "draft": {"queries": [0, 64], "seconds": [0.0, 4.0], "reward": [None, 0.7], "alignment": [0.5, 0.75]},
        "dpo": {"queries": [0, 80, 80], "seconds": [0.0, 3.0, 6.0], "reward": [None, None, None],
                "alignment": [0.5, 0.55, 0.72]},
    }  # fmt: skip
    saved = {"alignment_task": curves, "thickness_task": {}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    assert ca.main(["--replot", "--out", str(tmp_path)]) == 0
    # common: 64 queries (ddpo 128, draft 64; dpo offline), 4 s; the target 0.7, DDPO's at 20 s
    assert (tmp_path / "table.md").read_text() == (
        "| method | alignment before | at 64 queries | at 4 s | final | queries | seconds "
        "| queries to DDPO's final | s to DDPO's final | time / DDPO's |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| ddpo | 0.500 | 0.600 | 0.500 | 0.700 | 128 | 20 | 128 | 20 | 1.00 |\n"
        "| draft | 0.500 | 0.750 | 0.750 | 0.750 | 64 | 4 | 64 | 4 | 0.20 |\n"
        "| dpo | 0.500 | 0.500 | 0.550 | 0.720 | 80 | 6 | 80 | 6 | 0.30 |\n"
        "\nDDPO's final held-out alignment (the target): 0.700\n"
    )
