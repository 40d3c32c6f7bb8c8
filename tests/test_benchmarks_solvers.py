"""The solvers section runs its smoke suite through the suite and returns what it promises.

No timing thresholds: the schema of the result, that times and ratios are positive, that
the exact (eig) direction attains the largest damped-model decrease, that every training run
has a history, and that the report and the plot come out.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (CI runs `python -m pytest` from the root)
    sys.path.insert(0, str(ROOT))

from benchmarks import solvers, suite  # noqa: E402

STEP_ROWS = {"sgd", "eig", "eig_cached", "cg50", "cg50_tol0"}
NEWTON_KEYS = {
    "damped_model_decrease",
    "model_decrease",
    "batch_loss_change",
    "cg_iterations",
    "finite",
    "fraction_of_eig_decrease",
}
RUN_KEYS = {
    "damping",
    "initial_alpha",
    "history",
    "epochs_to_target",
    "seconds_to_target",
    "final_test_accuracy",
    "diverged",
    "steps",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("solvers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--suite", "smoke", "--sections", "solvers", "--out", str(out), "--no-progress"]
        return suite.main(argv), out
    finally:
        torch.set_num_threads(threads)


def test_section_schema_and_values(smoke):
    results, out = smoke
    section = results["sections"]["solvers"]
    assert section["status"] == "ok", section.get("traceback")
    assert section["plots"] == ["solvers.png"] and (out / "solvers.png").is_file()
    result = section["result"]
    assert result["schema_version"] == solvers.SCHEMA_VERSION and result["suite"] == "smoke"
    step = result["step"]
    assert set(step["rows"]) == STEP_ROWS
    assert set(step["blocks"].values()) == {"KroneckerBlock", "LowRankBlock"}
    for name, row in step["rows"].items():
        assert row["median_s"] > 0 and row["ratio_to_sgd"] > 0
        if name == "sgd":
            assert row["ratio_to_sgd"] == 1.0 and "model_decrease" not in row
            continue
        assert NEWTON_KEYS <= set(row) and row["finite"]
        assert math.isfinite(row["batch_loss_change"])
        # eig maximizes the damped model on the weights; the biases are solved alike
        assert row["damped_model_decrease"] <= step["rows"]["eig"]["damped_model_decrease"] * (
            1 + 1e-4
        )
    assert step["rows"]["eig"]["fraction_of_eig_decrease"] == 1.0
    assert step["rows"]["eig_cached"]["damped_model_decrease"] == pytest.approx(
        step["rows"]["eig"]["damped_model_decrease"], rel=1e-5
    )
    assert all(v == 0 for k, v in step["rows"]["eig"]["cg_iterations"].items() if "weight" in k)
    training = result["training"]
    assert [r["damping"] for r in training["runs"]] == ["lm", "constant"]
    for run in training["runs"]:
        assert set(run) == RUN_KEYS and run["history"]["epoch"]
        assert len(set(map(len, run["history"].values()))) == 1
        assert (run["epochs_to_target"] is None) == (run["seconds_to_target"] is None)
    assert training["runs"][1]["history"]["alpha"] == [0.1] * len(
        training["runs"][1]["history"]["alpha"]
    )


def test_report_and_json(smoke):
    results, out = smoke
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sections"]["solvers"]["status"] == "ok"
    assert on_disk["sections"]["cost"]["status"] == "skipped"
    report = (out / "report.md").read_text()
    assert "## Solvers: eig vs CG, LM vs constant damping" in report
    assert "| damping | initial alpha | epochs to 85% |" in report
    assert "solvers.png" in report
