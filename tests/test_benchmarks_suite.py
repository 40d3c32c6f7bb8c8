"""The benchmark suite (``python -m benchmarks``) on tiny configurations.

No timing thresholds: the structure of ``results.json`` and ``report.md``, that every measured
ratio is a positive finite number, that every ``n/a`` carries a reason, and that a failing
section is recorded instead of ending the run.
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

from benchmarks import cost, problems, suite  # noqa: E402
from benchmarks.cost import measure, peers  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:.*torch.jit.script.*:FutureWarning",
)

ROW_KEYS = {
    "group",
    "library",
    "method",
    "curvature",
    "status",
    "reason",
    "note",
    "ratios",
    "timings",
    "memory",
    "not_measured",
}
TIMING_KEYS = {"median_s", "q25_s", "q75_s", "min_s", "times", "repeats", "warmup", "contention"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``--suite smoke --sections cost``: one tiny problem, three methods, every peer."""
    out = tmp_path_factory.mktemp("suite")
    argv = ["--suite", "smoke", "--sections", "cost", "--out", str(out), "--no-progress"]
    threads = torch.get_num_threads()
    results = suite.main(argv + ["--threads", "1"])
    assert torch.get_num_threads() == threads  # --threads is undone after the run
    return results, out


def _rows(results):
    for name, problem in results["sections"]["cost"]["result"]["problems"].items():
        for row in problem["rows"]:
            yield name, row


def test_files_and_top_level_schema(smoke):
    results, out = smoke
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema_version"] == suite.SCHEMA_VERSION
    assert on_disk["suite"] == "smoke"
    env = on_disk["environment"]
    for key in ("torch", "device", "torch_num_threads", "git_commit", "device_name"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["torch_num_threads"] == 1
    assert set(on_disk["sections"]) == set(suite.SECTIONS)
    assert on_disk["sections"]["cost"]["status"] == "ok"
    for name in ("accuracy", "convergence", "seed"):
        assert on_disk["sections"][name]["status"] == "skipped"
    assert on_disk["datasets"]["seed_logreg"]["synthetic"] is False
    assert (out / "report.md").is_file() and (out / "cost.png").stat().st_size > 0
    assert on_disk["sections"]["cost"]["plots"] == ["cost.png"]


def test_cost_rows_ratios_and_reasons(smoke):
    results, _ = smoke
    cost_result = results["sections"]["cost"]["result"]
    problem = cost_result["problems"]["seed_logreg"]
    assert problem["batch_size"] == 32 and problem["data"]["synthetic"] is False
    assert set(problem["baseline"]) == {"grad", "grad_traced"}
    for timing in problem["baseline"].values():
        assert TIMING_KEYS <= set(timing) and timing["median_s"] > 0
    rows = list(_rows(results))
    assert rows
    for _, row in rows:
        assert ROW_KEYS <= set(row), row
        assert row["status"] in ("ok", "n/a")
        if row["status"] == "n/a":
            assert isinstance(row["reason"], str) and row["reason"].strip(), row
            assert not row["ratios"]
        else:
            assert row["ratios"], row
        for m, value in row["ratios"].items():
            assert m in cost.MEASUREMENTS
            assert math.isfinite(value) and value > 0, (row["method"], m, value)
            assert TIMING_KEYS <= set(row["timings"][m])
            assert row["memory"][m]["kind"] == cost_result["memory_kind"]
        for m, reason in row["not_measured"].items():
            assert m in cost.MEASUREMENTS and isinstance(reason, str) and reason.strip()
            assert m not in row["ratios"]
    curvgraph_rows = {(r["group"], r["curvature"]) for _, r in rows if r["library"] == "curvgraph"}
    assert curvgraph_rows == {
        ("hbp/ggn", "ggn"),
        ("exact/ggn", "ggn"),
        ("exact/hessian", "hessian"),
        ("kfac", "ggn"),
    }
    for _, row in rows:
        if row["library"] == "curvgraph":
            assert row["status"] == "ok" and set(row["ratios"]) == set(cost.MEASUREMENTS)


def test_peers_reported_never_dropped(smoke):
    results, _ = smoke
    rows = [r for _, r in _rows(results)]
    libraries = {r["library"] for r in rows}
    assert {"backpack", "curvlinops", "torch.func"} <= libraries
    installed = results["sections"]["cost"]["result"]["peers"]
    for peer in ("backpack", "curvlinops"):
        peer_rows = [r for r in rows if r["library"] == peer]
        if installed[peer] is None:
            assert all("not installed" in r["reason"] for r in peer_rows)
        else:
            assert any(r["status"] == "ok" for r in peer_rows), peer


def test_goals_and_report(smoke):
    results, out = smoke
    report = (out / "report.md").read_text()
    assert "# curvgraph benchmark suite (smoke)" in report
    assert "## Cost: curvature time / gradient time" in report
    assert "### seed_logreg:" in report and "![cost: cost.png](cost.png)" in report
    assert "| seed_logreg | MNIST subset" in report  # the data table: real or synthetic
    assert "torch threads" in report and torch.__version__ in report
    for _, row in _rows(results):
        if row["status"] == "n/a":
            assert row["reason"].split("\n")[0][:40] in report
    # the goals concern mnist_mlp and cifar10_3c3d, which the smoke suite does not run
    assert results["sections"]["cost"]["result"]["goals"] == []


def test_goal_evaluation():
    def row(library, group, method, ratios, medians):
        return {
            "library": library,
            "status": "ok",
            "group": group,
            "method": method,
            "curvature": "ggn",
            "ratios": ratios,
            "reason": None,
            "not_measured": {},
            "timings": {m: {"median_s": v} for m, v in medians.items()},
        }

    rows = [
        row(
            "curvgraph",
            "kfac",
            "kfac",
            {"pass": 1.5, "total": 2.5, "product": 0.5},
            {"pass": 0.15, "total": 0.25, "product": 0.05},
        ),
        row("backpack", "kfac", "KFAC", {"total": 4.0}, {"total": 0.4}),
    ]
    floors = {"kfac_pass": 0.5, "kfac_product": 0.8, "kflr_product": 0.05}
    problem = {"rows": rows, "floors": floors, "baseline": {"grad": {"median_s": 0.1}}}
    goals = cost.evaluate_goals({"mnist_mlp": problem})
    by_goal = {g["goal"]: g for g in goals}
    assert by_goal["kfac pass <= 2x gradient"]["status"] == "met"
    preparation = by_goal["kfac preparation <= 0.5x BackPACK KFAC"]
    assert preparation["value"] == pytest.approx(0.15 / 0.4) and preparation["status"] == "met"
    assert preparation["floor"] == pytest.approx(0.5 * 0.1 / 0.4)
    strict = by_goal["kfac <= 0.5x BackPACK KFAC (stricter: with the forward and backward)"]
    assert strict["value"] == pytest.approx(0.625) and strict["status"] == "not met"
    assert strict["floor"] == pytest.approx(1.5 * 0.1 / 0.4)  # 0.375: feasible
    product = by_goal["kfac all-block product from prepared Kronecker blocks <= 0.1x gradient"]
    assert product["status"] == "not met (infeasible)" and "0.8" in product["floor_note"]
    kflr = by_goal["kflr <= BackPACK KFLR"]
    assert kflr["status"] == "not measured" and kflr["reason"]


def test_operation_floors_count_a_linear_layer():
    """The floors of one linear layer follow from its shape (MACs counted by hand)."""
    from benchmarks.cost.floors import operation_floors

    model = torch.nn.Sequential(torch.nn.Linear(30, 20, bias=False))
    x, y = torch.randn(8, 30), torch.randint(0, 20, (8,))
    floors = operation_floors(model, x, y, torch.nn.functional.cross_entropy, 20)
    # forward 8*30*20 MACs, weight gradient the same (no input gradient needed)
    assert floors["gradient_flops"] == 2 * 2 * 8 * 30 * 20
    product_macs = 20 * 30 * min(20 + 30, min(20, 8) + min(30, 8))  # low rank: 16
    assert floors["kfac_product"] == pytest.approx(2 * product_macs / floors["gradient_flops"])
    factor_macs = 8 * (30**2 + 20**2) // 2
    assert floors["kfac_pass"] == pytest.approx(2 * factor_macs / floors["gradient_flops"])


def test_operation_floor_of_hbp_counts_root_products():
    """HBP's GGN floor: C d_out^2 / 2 per layer, C d_out d_in per layer after the first."""
    from benchmarks.cost.floors import operation_floors

    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
    x, y = torch.randn(8, 30), torch.randint(0, 5, (8,))
    floors = operation_floors(model, x, y, torch.nn.functional.cross_entropy, 5)
    macs = 5 * 20 * 20 // 2 + 5 * 5 * 5 // 2 + 5 * 5 * 20
    assert floors["hbp_pass"] == pytest.approx(2 * macs / floors["gradient_flops"])
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    x = torch.randn(8, 1, 4, 4)
    assert operation_floors(conv, x, y, torch.nn.functional.cross_entropy, 5)["hbp_pass"] is None


def test_failing_section_is_recorded(tmp_path, monkeypatch):
    def broken(args, out):
        raise RuntimeError("accuracy exploded")

    monkeypatch.setitem(suite.RUNNERS, "accuracy", broken)
    results = suite.main(
        ["--suite", "smoke", "--sections", "accuracy", "--out", str(tmp_path), "--no-progress"]
    )
    section = results["sections"]["accuracy"]
    assert section["status"] == "failed"
    assert "RuntimeError: accuracy exploded" in section["error"] and section["traceback"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["sections"]["accuracy"]["status"] == "failed"
    assert on_disk["sections"]["cost"]["status"] == "skipped"
    assert "**failed**: RuntimeError: accuracy exploded" in (tmp_path / "report.md").read_text()


def test_seed_section(tmp_path, monkeypatch):
    """The seed section calls the tutorial's main with --out/--json/--device (faked here)."""
    from curvgraph.examples import seed_tutorial

    calls = []

    def fake_main(argv):
        calls.append(argv)
        Path(argv[argv.index("--out") + 1]).write_bytes(b"png")
        print("Epoch [1/2], Iter. [1/16], Loss: 2.3, Acc.: 0.1")
        return {
            "train_epoch": [0.5, 1.0, 1.5, 2.0],
            "batch_loss": [2.0, 1.0, 0.5, 0.3],
            "batch_acc": [0.2, 0.6, 0.8, 0.9],
        }

    monkeypatch.setattr(seed_tutorial, "main", fake_main)
    results = suite.main(
        ["--suite", "smoke", "--sections", "seed", "--out", str(tmp_path), "--no-progress"]
    )
    assert calls and calls[0][calls[0].index("--device") + 1] == "cpu"
    seed = results["sections"]["seed"]
    assert seed["status"] == "ok" and seed["plots"] == ["seed_tutorial.png"]
    final = seed["result"]["final"]
    assert final["last_epoch_mean_batch_loss"] == pytest.approx(0.4)
    assert final["last_epoch_mean_batch_accuracy"] == pytest.approx(0.85)
    assert seed["result"]["stdout"] == ["Epoch [1/2], Iter. [1/16], Loss: 2.3, Acc.: 0.1"]
    report = (tmp_path / "report.md").read_text()
    assert "![seed tutorial: batch loss and accuracy](seed_tutorial.png)" in report
    assert "0.4000" in report


def test_peer_not_installed_is_reported(monkeypatch):
    real = peers.installed
    monkeypatch.setattr(peers, "installed", lambda m: False if m == "backpack" else real(m))
    config = cost.config_for("smoke", methods=["kfac"], peers=["backpack"])
    config.repeats = 1
    result = cost.run(config, progress=False)
    rows = result["problems"]["seed_logreg"]["rows"]
    backpack = [r for r in rows if r["library"] == "backpack"]
    assert backpack and all(r["status"] == "n/a" for r in backpack)
    assert all("not installed" in r["reason"] for r in backpack)
    assert "not installed" in cost.markdown(result)


def test_budgets_and_limits(monkeypatch):
    """A call over the time limit and factors over the memory budget become n/a with why."""
    config = cost.config_for("smoke", methods=["sqrt", "kfac"], peers=[])
    config.repeats, config.memory_budget_gib = 1, 1e-6
    original = measure.curvgraph_cell

    def slow_kfac(bench, method, curvature):
        cell = original(bench, method, curvature)
        if method == "kfac":
            fn, setup = cell.measurements["pass"]

            def sleepy(*args):
                import time

                time.sleep(5)
                return fn(*args)

            cell.measurements["pass"] = (sleepy, setup)
        return cell

    monkeypatch.setattr(measure, "curvgraph_cell", slow_kfac)
    config.cell_budget_s = 1.0
    rows = cost.run(config, progress=False)["problems"]["seed_logreg"]["rows"]
    sqrt = next(r for r in rows if r["group"] == "sqrt")
    assert sqrt["status"] == "n/a" and "memory budget" in sqrt["reason"]
    kfac = next(r for r in rows if r["group"] == "kfac")
    assert kfac["status"] == "ok" and "time budget" in kfac["not_measured"]["pass"]
    assert set(kfac["ratios"]) == {"total", "product"}


def test_time_limit():
    import time

    with pytest.raises(cost.CellTimeout):
        with cost.time_limit(0.2):
            time.sleep(2)
    with cost.time_limit(5):  # no alarm left behind
        pass
    time.sleep(0.05)


def test_cli_errors(capsys):
    for argv in (
        ["--sections", "nope"],
        ["--problems", "nope"],
        ["--methods", "nope"],
        ["--peers", "nope"],
        ["--repeats", "0"],
    ):
        with pytest.raises(SystemExit):
            suite.parse_args(argv)
    args = suite.parse_args(
        [
            "--sections",
            "cost,seed",
            "--problems",
            "mnist_mlp",
            "cifar10_3c3d",
            "--peers",
            "none",
            "--repeats",
            "2",
        ]
    )
    assert args.sections == ["cost", "seed"] and args.peers == []
    assert args.cost_config.problems == {"mnist_mlp": 128, "cifar10_3c3d": 128}
    assert args.cost_config.repeats == 2 and args.cost_config.peers == ()


@pytest.mark.parametrize("name", list(problems.PROBLEMS))
def test_problems(name):
    problem = problems.PROBLEMS[name]
    x, y = problem.batch(4, dtype=torch.float64)
    assert x.shape == (4, *problem.input_shape) and x.dtype == torch.float64
    assert y.dtype == torch.int64 and y.shape == (4,)
    model = problem.model(dtype=torch.float64)
    out = model(x)
    assert out.shape == (4, 10)
    assert problem.loss(out, y).ndim == 0
    info = problem.data()
    assert {"dataset", "loader", "synthetic", "source", "note"} <= set(info)
    if name == "cifar10_3c3d" and info["synthetic"]:
        assert info["note"]
    if name.startswith(("mnist", "seed", "sigmoid", "small")):
        assert info["synthetic"] is False


def test_fashion_mnist_fallback(tmp_path):
    info = problems.data_info("fashion-mnist", str(tmp_path))
    assert info["loader"] == "mnist" and "not found" in info["note"]
    x, y = problems.PROBLEMS["fmnist_2c2d"].batch(3, data_dir=str(tmp_path))
    assert x.shape == (3, 1, 28, 28)


def test_sqrt_at_reduced_batch():
    """Square-root factors over the memory budget: the sqrt rows again at a smaller N."""
    config = cost.config_for("smoke", methods=["sqrt"], peers=["backpack"])
    config.repeats = 1
    config.memory_budget_gib = 10 * 16 * 7850 * 4 / 2**30  # fits N = 16 of N = 32
    problem = cost.run(config, progress=False)["problems"]["seed_logreg"]
    rows = [r for r in problem["rows"] if r["group"] == "sqrt"]
    assert [r["batch_size"] for r in rows] == [32, 32, 16, 16]
    assert all(r["status"] == "n/a" and "memory budget" in r["reason"] for r in rows[:2])
    reduced = rows[2:]
    assert [r["library"] for r in reduced] == ["curvgraph", "backpack"]
    for row in reduced:
        assert row["status"] == "ok" and "at N = 16" in row["method"]
        assert all(math.isfinite(v) and v > 0 for v in row["ratios"].values())
    assert problem["reduced_sqrt"]["batch_size"] == 16
