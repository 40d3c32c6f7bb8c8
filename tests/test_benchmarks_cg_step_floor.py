"""The full iteration's floor of the cg_step section: its arithmetic and what it times."""

from __future__ import annotations

import torch
from torch import nn

import curvgraph
from benchmarks.cg_step.candidates import SeedCalls
from benchmarks.cg_step.floors import iteration_floor, iteration_floor_lines
from benchmarks.cg_step.run import _goals


def _results():
    ms = {
        "sgd_step": 0.08,
        "cgnewton_step": 1.5,
        "cgnewton_step_compiled": 0.6,
        "sgd_iteration": 0.7,
        "cgnewton_iteration": 3.0,
        "cgnewton_iteration_compiled": 2.1,
        "product": 0.1,
        "output_hessian_floor": 0.02,
        "hbp_block_floor": 0.03,
    }
    timings = {n: {"median_s": v / 1e3, "cpu_median_s": v / 1e3} for n, v in ms.items()}
    launches = {
        "product": {"aten_top_level": 10},
        "sgd_iteration": {"aten_top_level": 20},
    }
    results = {"timings": timings, "launches": launches, "cg_iterations": {"w": 4, "b": 1}}
    results["goals"] = _goals(results)
    return results


def test_iteration_floor_adds_the_output_hessian_the_block_and_the_products():
    results = _results()
    floor = iteration_floor(results)
    expected = (0.7 + 0.02 + 0.03 + 4 * 0.1) / 0.7
    assert abs(floor["cpu"] - expected) < 1e-12 and abs(floor["wall"] - expected) < 1e-12
    assert floor["extra_launches"] == 6 + 1 + 4 * (10 + 5)
    assert abs(floor["launch_ratio"] - (20 + 67) / 20) < 1e-12
    results["iteration_floor"] = floor
    (line,) = [x for x in iteration_floor_lines(results) if x]
    assert f"{expected:.2f}x" in line and "goal is above this floor" in line
    assert "3.00x CPU" in line  # the compiled iteration's measured ratio beside it


def test_missing_timings_give_no_floor():
    results = _results()
    del results["timings"]["hbp_block_floor"]
    assert iteration_floor(results) == {"status": "n/a"}


def test_the_floor_candidates_compute_the_seed_iterations_work():
    calls = SeedCalls()
    out = calls.graph(calls.x)
    loss = nn.functional.cross_entropy(out, calls.y)
    torch.testing.assert_close(
        calls.output_hessian_floor(), curvgraph.loss_hessian(loss, out), rtol=1e-5, atol=1e-7
    )
    weight = calls.curvature["weight"].to_dense()
    hessian = calls.output_hessian_floor()
    mean = calls.hbp_block_floor()
    expected = torch.kron(hessian, torch.outer(mean, mean))  # H (x) xbar xbar^T
    torch.testing.assert_close(weight, expected, rtol=1e-4, atol=1e-9)


def test_measured_launches_of_the_floor_candidates_replace_the_operator_count():
    results = _results()
    results["launches"]["output_hessian_floor"] = {"aten_top_level": 10}
    results["launches"]["hbp_block_floor"] = {"aten_top_level": 1}
    floor = iteration_floor(results)
    assert floor["hessian_launches"] == 10
    assert floor["extra_launches"] == 10 + 1 + 4 * (10 + 5)
