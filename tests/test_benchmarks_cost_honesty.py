"""The cost section on a busy machine: CPU time beside wall time, over-budget rows kept in
cost.png, peak memory of each row in a fresh process. Tiny configurations, no timing
thresholds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cost  # noqa: E402
from benchmarks.common import fmt_number  # noqa: E402
from benchmarks.cost import fresh_memory, measure, worker  # noqa: E402
from benchmarks.cost.plot import total_bar  # noqa: E402
from benchmarks.cost.report import problem_markdown  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:.*torch.jit.script.*:FutureWarning",
)


@pytest.fixture(scope="module")
def slow_kfac():
    """kfac and exact/ggn on the smoke problem, with kfac's total slowed past its limit."""
    config = cost.config_for("smoke", methods=["kfac", "exact"], peers=["curvlinops"])
    config.curvatures = {"kfac": ("ggn",), "exact": ("ggn",)}
    config.repeats, config.cell_budget_s = 1, 1.0
    original = measure.curvgraph_cell

    def slowed(bench, method, curvature):
        cell = original(bench, method, curvature)
        if method == "kfac":
            fn, setup = cell.measurements["total"]

            def sleepy(*args):
                time.sleep(3)
                return fn(*args)

            cell.measurements["total"] = (sleepy, setup)
        return cell

    measure.curvgraph_cell = slowed
    try:
        return cost.run(config, progress=False)
    finally:
        measure.curvgraph_cell = original


def test_cpu_ratio_beside_wall_ratio(slow_kfac):
    problem = slow_kfac["problems"]["seed_logreg"]
    grad = problem["baseline"]["grad"]
    assert grad["cpu_median_s"] > 0
    text = cost.markdown(slow_kfac)
    exact = next(r for r in problem["rows"] if r["group"] == "exact/ggn")
    timing = exact["timings"]["total"]
    wall = fmt_number(exact["ratios"]["total"])
    cpu = fmt_number(timing["cpu_median_s"] / grad["cpu_median_s"])
    assert f"| {wall} ({cpu}) |" in text
    assert "CPU time of the process" in text and "; CPU " in text  # the gradient's CPU ms


def test_over_budget_row_is_drawn_not_dropped(slow_kfac, tmp_path):
    problem = slow_kfac["problems"]["seed_logreg"]
    grad = problem["baseline"]["grad"]
    kfac = next(r for r in problem["rows"] if r["group"] == "kfac" and r["library"] == "curvgraph")
    assert "total" not in kfac["ratios"] and "time budget" in kfac["not_measured"]["total"]
    kind, value, label = total_bar(kfac, grad, 1.0)
    assert kind == "over budget" and label.startswith("over budget: one probe call > ")
    assert value == pytest.approx(1.0 / grad["median_s"])  # at least the limit it ran past
    # a measurement dropped by the problem's budget keeps its probe's estimate
    dropped = dict(kfac, probe_s={"total": 2.5})
    assert total_bar(dropped, grad, 1.0)[1] == pytest.approx(2.5 / grad["median_s"])
    exact = next(r for r in problem["rows"] if r["group"] == "exact/ggn")
    assert total_bar(exact, grad, 1.0)[0] == "measured"
    assert "CPU" in total_bar(exact, grad, 1.0)[2]
    na = {"ratios": {}, "not_measured": {}, "reason": "not installed (pip install x)"}
    assert total_bar(na, grad, 1.0) == ("n/a", None, "n/a: not installed (pip install x)")
    skipped = dict(na, reason="left out of the quick suite to keep it within its time budget")
    assert total_bar(skipped, grad, 1.0)[0] == "n/a"  # a preset's skip is not a slow call
    paths = cost.plot(slow_kfac, tmp_path)
    assert paths == [tmp_path / "cost.png"] and paths[0].stat().st_size > 0


def test_worker_rebuilds_every_measured_row(slow_kfac):
    """The fresh-process worker finds each row's cell by the key the row reports."""
    problem = slow_kfac["problems"]["seed_logreg"]
    config = cost.config_for("smoke")
    config.fresh_memory = "all"
    chosen = fresh_memory.fresh_rows("seed_logreg", problem["rows"], config)
    rows = [problem["rows"][i] for i in chosen]
    assert {r["library"] for r in rows} == {"curvgraph", "curvlinops"}
    assert any("total" not in r["ratios"] for r in rows)  # kfac: over budget, memory wanted
    for row in rows:
        spec = json.loads(fresh_memory._spec("seed_logreg", 32, row))
        keys = ("problem", "n", "group", "library", "key")
        plan = worker.make_plan("smoke", *(spec[k] for k in keys))
        assert callable(plan["call"])


SLOW = os.environ.get("CURVGRAPH_SLOW_TESTS") == "1"


@pytest.mark.parametrize(
    "spawn",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not SLOW, reason="set CURVGRAPH_SLOW_TESTS=1")),
    ],
    ids=["worker-in-this-process", "fork-servers"],
)
def test_fresh_process_peaks(spawn, monkeypatch, capsys):
    """Peaks of the gradient and the kfac row; the worker runs here unless ``spawn``."""
    if not spawn:  # the same JSON specs and measurement, without the fork server's imports

        def in_process(suite, specs, timeout):
            threads = torch.get_num_threads()
            try:
                return [
                    fresh_memory._with_over_imports(
                        {"status": "ok", **worker.measure(suite, json.loads(spec))}
                    )
                    for spec in specs
                ]
            finally:
                torch.set_num_threads(threads)  # the worker runs on one thread

        monkeypatch.setattr(fresh_memory, "_serve", in_process)
    config = cost.config_for("smoke", methods=["kfac"], peers=[])
    config.repeats, config.fresh_memory = 1, "all"
    problem = cost.run(config, progress=False)["problems"]["seed_logreg"]
    grad = problem["baseline_fresh_memory"]
    assert grad["status"] == "ok", grad
    row = next(r for r in problem["rows"] if r["group"] == "kfac")
    fresh = row["fresh_memory"]
    assert fresh["status"] == "ok", fresh
    assert fresh["peak_bytes"] >= fresh["setup_bytes"] > 0 and fresh["baseline_bytes"] > 0
    # malloc_trim before the call may hand back a few pages freed since the imports' level
    assert fresh["setup_bytes"] >= fresh["baseline_bytes"] - 2**20
    assert fresh["over_imports_bytes"] == fresh["peak_bytes"] - fresh["baseline_bytes"]
    text = problem_markdown("seed_logreg", problem, [])
    ratio = fmt_number(fresh["over_imports_bytes"] / grad["over_imports_bytes"])
    assert f"({ratio}) |" in text and "Gradient's fresh-process peak" in text
    assert problem["fresh_memory_workers"]["count"] == 2 and "2 fresh processes" in text
    assert fresh_memory.fresh_rows("seed_logreg", problem["rows"], config) == [0]
    config.fresh_memory = "goal"  # seed_logreg is no goal problem
    assert fresh_memory.fresh_rows("seed_logreg", problem["rows"], config) == []
