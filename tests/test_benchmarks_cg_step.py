"""The cg_step benchmark section: launch counting, the floors, the report (no timing asserted)."""

from __future__ import annotations

import torch

from benchmarks.cg_step.launches import floor, launches
from benchmarks.cg_step.run import GOALS, _goals, _time_floor, markdown, plot


def test_launches_count_computing_operators_not_views():
    x = torch.randn(4, 5)
    assert launches(lambda: x.reshape(5, 4).unsqueeze(0).squeeze(0)) == {
        "aten_top_level": 0,
        "compiled_regions": 0,
    }
    counts = launches(lambda: (x.reshape(5, 4).unsqueeze(0) * 2.0).sum())
    assert counts["aten_top_level"] == 2  # mul and sum; reshape and unsqueeze are views
    # a reshape that must copy computes (its copy counts, once, as the reshape)
    assert launches(lambda: x.t().reshape(-1))["aten_top_level"] == 1
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones(3)
    sgd = torch.optim.SGD(params, lr=0.1)
    assert 1 <= launches(sgd.step)["aten_top_level"] <= 2  # one or two fused updates


def test_floor_is_iterations_times_product_reductions_updates():
    fl = floor(iterations=4, product=6, sgd=2)
    assert fl["per_iteration"] == 6 + 2 + 3
    assert fl["cg_launches"] == 44 and fl["ratio"] == 22.0


def _result(step_ms, iteration_ms):
    names = [
        "sgd_step",
        "cgnewton_step",
        "cgnewton_step_compiled",
        "sgd_iteration",
        "cgnewton_iteration",
        "cgnewton_iteration_compiled",
        "product",
    ]
    values = [0.02, step_ms * 2, step_ms, 0.7, iteration_ms, iteration_ms, 0.05]
    timings = {
        n: {"median_s": v / 1e3, "q25_s": v / 1e3, "q75_s": v / 1e3, "cpu_median_s": v / 1e3}
        for n, v in zip(names, values)
    }
    results = {
        "environment": {"git_commit": "abc"},
        "load_before": [1.0],
        "load_after": [1.0],
        "cg_iterations": {"weight": 4, "bias": 1},
        "timings": timings,
        "launches": {
            **{n: {"aten_top_level": 10, "compiled_regions": 0} for n in names[:3]},
            "product": {"aten_top_level": 6, "compiled_regions": 0},
            "floor": floor(4, 6, 2),
        },
    }
    results["goals"] = _goals(results)
    results["time_floor"] = _time_floor(results)
    return results


def test_goals_met_and_not_met_and_the_report(tmp_path):
    met = _result(step_ms=0.05, iteration_ms=1.5)  # 2.5x and 2.1x
    missed = _result(step_ms=0.5, iteration_ms=3.5)  # 25x and 5x
    assert [g["met"] for g in met["goals"]] == [True, True, True, None]
    assert [g["met"] for g in missed["goals"]] == [False, False, False, None]
    assert len(met["goals"]) == len(GOALS)
    assert abs(met["time_floor"]["wall"] - 4 * 0.05 / 0.02) < 1e-9
    text = markdown(missed)
    assert text.count("not met") == 3 and "floor ratio 22.0" in text
    (path,) = plot(missed, tmp_path)
    assert path.stat().st_size > 0
