"""The suite's report.md is written as sections finish, and an interrupted run leaves one.

A tiny two-section configuration: the seed section (its tutorial faked, as in
test_benchmarks_suite.py) and then an accuracy section replaced by one that reads report.md
(what a reader would find after the first section) and is then interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from curvgraph import progress  # noqa: E402


def _fake_seed_main(argv):
    Path(argv[argv.index("--out") + 1]).write_bytes(b"png")
    return {
        "train_epoch": [0.5, 1.0, 1.5, 2.0],
        "batch_loss": [2.0, 1.0, 0.5, 0.3],
        "batch_acc": [0.2, 0.6, 0.8, 0.9],
    }


def test_interrupted_run_leaves_a_readable_report(tmp_path, monkeypatch):
    from curvgraph.examples import seed_tutorial

    monkeypatch.setattr(seed_tutorial, "main", _fake_seed_main)
    seen = {}

    def interrupted(args, out):
        seen["report"] = (out / "report.md").read_text()
        seen["json"] = json.loads((out / "results.json").read_text())
        seen["curvgraph bars"] = progress.progress_mode()
        raise KeyboardInterrupt

    monkeypatch.setitem(suite.RUNNERS, "accuracy", interrupted)
    argv = ["--suite", "smoke", "--sections", "seed,accuracy", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        suite.main(argv + ["--no-progress"])

    # after the first section: its results in the report, the second one pending
    during = seen["report"]
    assert "# curvgraph benchmark suite (smoke)" in during
    assert "![seed tutorial: batch loss and accuracy](seed_tutorial.png)" in during
    assert "0.4000" in during  # the seed section's last-epoch mean batch loss
    assert "| accuracy | **pending** (no results) |" in during
    assert "**Run not finished**" in during and "accuracy not complete" in during
    assert seen["json"]["sections"]["seed"]["status"] == "ok"
    assert seen["json"]["sections"]["accuracy"]["status"] == "pending"
    seed_row = next(line for line in during.splitlines() if line.startswith("| seed | ok |"))
    wall, cpu = (float(cell) for cell in seed_row.split("|")[3:5])
    assert wall >= 0 and cpu >= 0  # wall time and CPU time side by side

    assert seen["curvgraph bars"] is False  # none inside timed calls
    assert progress.progress_mode() is None  # handed back after the run

    # after the interruption: the same report, the second section marked interrupted
    after = (tmp_path / "report.md").read_text()
    assert "| accuracy | **interrupted** (no results) |" in after
    assert "![seed tutorial: batch loss and accuracy](seed_tutorial.png)" in after
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sections"]["accuracy"]["status"] == "interrupted"
    assert not list(tmp_path.glob("*.partial"))


def test_finished_run_reports_cpu_time_and_load(tmp_path, monkeypatch):
    from curvgraph.examples import seed_tutorial

    monkeypatch.setattr(seed_tutorial, "main", _fake_seed_main)
    results = suite.main(
        ["--suite", "smoke", "--sections", "seed", "--out", str(tmp_path), "--no-progress"]
    )
    seed = results["sections"]["seed"]
    assert seed["cpu_s"] >= 0 and "load_average_end" in seed
    text = (tmp_path / "report.md").read_text()
    assert "Total wall time" in text and "Run not finished" not in text
    assert "| section | status | wall time [s] | CPU time [s] | load average at its end |" in text
