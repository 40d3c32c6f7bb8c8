"""The convergence benchmark runs its smoke suite end to end and returns what it promises.

No timing thresholds: the structure of the result, that times are positive and finite, that
every optimizer family appears, that the selection and the to-target numbers follow their
stated rules, that divergence is recorded, and that the report and the plots come out.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (CI runs `python -m pytest` from the root)
    sys.path.insert(0, str(ROOT))

from benchmarks import convergence  # noqa: E402
from benchmarks.convergence.data import load_data  # noqa: E402
from benchmarks.convergence.report import fmt_target  # noqa: E402
from benchmarks.convergence.runner import aggregate_runs, summary_stats, to_target  # noqa: E402
from benchmarks.convergence.training import finite_or_none, train  # noqa: E402

TOP_KEYS = {
    "schema_version",
    "suite",
    "device",
    "torch_version",
    "torch_num_threads",
    "dataset",
    "target_accuracy",
    "seeds",
    "protocol",
    "grids",
    "families",
    "problems",
    "wall_time_s",
    "contention",
    "load_average",
}
PROBLEM_KEYS = {
    "title",
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "num_parameters",
    "target_accuracy",
    "summary",
    "configs",
}
RUN_KEYS = {
    "seed",
    "history",
    "steps",
    "diverged",
    "diverged_epoch",
    "final_train_loss",
    "final_test_loss",
    "final_test_accuracy",
    "train_time_s",
    "epochs_to_target",
    "seconds_to_target",
    "cg",
    "warnings",
    "others_cpu_fraction",
}
HISTORY_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "time_s"}


@pytest.fixture(scope="module")
def smoke():
    """The smoke suite on the CPU with one torch thread (a few seconds even on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return convergence.run("smoke", "cpu", None, False)
    finally:
        torch.set_num_threads(threads)


def _positive_finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_schema_and_json(smoke):
    assert set(smoke) == TOP_KEYS
    assert smoke["suite"] == "smoke" and smoke["device"] == "cpu"
    assert json.loads(json.dumps(smoke, allow_nan=False)) == smoke  # strict JSON, no NaN
    assert smoke["dataset"]["name"].startswith("MNIST subset")
    assert smoke["dataset"]["n_train"] == 1024 and smoke["dataset"]["n_test"] == 512
    assert smoke["target_accuracy"] == convergence.TARGETS["mnist-subset"]
    assert set(smoke["problems"]) == set(convergence.PROBLEMS)
    assert _positive_finite(smoke["wall_time_s"])
    for problem in smoke["problems"].values():
        assert set(problem) == PROBLEM_KEYS
        assert problem["steps_per_epoch"] >= 1


def test_every_optimizer_and_curvature_appears(smoke):
    spec = convergence.SUITES["smoke"]
    for problem in smoke["problems"].values():
        assert [row["family"] for row in problem["summary"]] == list(convergence.FAMILIES)
        families = {c["family"] for c in problem["configs"]}
        assert families == {"sgd", "adam"} | {f"cgnewton-{c}" for c in convergence.CURVATURES}
        expected = len(spec.sgd_lrs) + len(spec.adam_lrs)
        expected += len(convergence.CURVATURES) * len(spec.cgnewton_lrs)
        assert len(problem["configs"]) == expected
        seed_settings = [c for c in problem["configs"] if c["seed_settings"]]
        assert {c["curvature"] for c in seed_settings} == set(convergence.CURVATURES)
        for c in seed_settings:
            assert c["hyperparameters"] == convergence.SEED_CGNEWTON


def test_runs_histories_and_times(smoke):
    seeds = smoke["seeds"]
    for problem in smoke["problems"].values():
        epochs = problem["epochs"]
        for config in problem["configs"]:
            assert [r["seed"] for r in config["runs"]] == seeds
            for run in config["runs"]:
                assert set(run) == RUN_KEYS
                history = run["history"]
                assert set(history) == HISTORY_KEYS
                assert not run["diverged"], (config["id"], run["seed"])
                assert history["epoch"] == list(range(epochs + 1))
                assert history["train_loss"][0] is None and history["time_s"][0] == 0.0
                assert all(_positive_finite(v) for v in history["train_loss"][1:])
                assert all(_positive_finite(v) for v in history["test_loss"])
                assert all(0.0 <= a <= 1.0 for a in history["test_accuracy"])
                times = history["time_s"][1:]
                assert all(_positive_finite(t) for t in times)
                assert times == sorted(times)
                assert run["train_time_s"] == times[-1]
                assert run["steps"] == epochs * problem["steps_per_epoch"]
                assert run["final_test_accuracy"] == history["test_accuracy"][-1]
                if config["family"].startswith("cgnewton"):
                    assert run["cg"]["block_solves"] > 0
                    assert run["cg"]["iterations_per_block_solve"] >= 1
                    assert 0.0 <= run["cg"]["nonpositive_curvature_fraction"] <= 1.0
                else:
                    assert run["cg"] is None


def test_to_target_follows_history(smoke):
    target = smoke["target_accuracy"]
    for problem in smoke["problems"].values():
        for config in problem["configs"]:
            for run in config["runs"]:
                h = run["history"]
                hits = [i for i, a in enumerate(h["test_accuracy"]) if a >= target]
                if hits:
                    assert run["epochs_to_target"] == h["epoch"][hits[0]]
                    assert run["seconds_to_target"] == h["time_s"][hits[0]]
                else:
                    assert run["epochs_to_target"] is None and run["seconds_to_target"] is None


def test_selection_rule(smoke):
    for problem in smoke["problems"].values():
        for row in problem["summary"]:
            candidates = [c for c in problem["configs"] if c["family"] == row["family"]]
            selected = [c for c in candidates if c["selected"]]
            assert len(selected) == 1 and selected[0]["id"] == row["config"]
            best = selected[0]["aggregate"]["final_test_accuracy"]["mean"]
            assert all(c["aggregate"]["final_test_accuracy"]["mean"] <= best for c in candidates)
            assert row["final_test_accuracy"] == selected[0]["aggregate"]["final_test_accuracy"]
            assert row["grid_edge"] == (len(candidates) > 1)  # smoke grids: 1 or 2 values
            assert _positive_finite(row["time_per_epoch_vs_sgd"])
        assert problem["summary"][0]["time_per_epoch_vs_sgd"] == 1.0


def test_aggregation_helpers():
    assert to_target([2, None, 1]) == {
        "median": 2,
        "per_seed": [2, None, 1],
        "reached": 2,
        "seeds": 3,
    }
    assert to_target([1, None])["median"] is None  # inf median: not reached
    assert fmt_target(to_target([None, None]), "epochs") == ("n/a (not reached; 0/2 seeds)")
    assert fmt_target(to_target([1.5, 2.5]), "seconds") == ("2.00 s (2/2 seeds)")
    assert summary_stats([None, 1.0, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert finite_or_none(float("nan")) is None and finite_or_none(2) == 2.0


def test_divergence_is_recorded_not_dropped():
    spec = convergence.SUITES["smoke"]
    info, data = load_data(spec, None)
    problem = convergence.PROBLEMS["logreg"]
    config = {"family": "sgd", "hyperparameters": {"lr": float("inf")}, "id": "sgd lr=inf"}
    run = train(problem, config, 0, 3, 256, data, info, 0.88, torch.device("cpu"), None)
    assert run["diverged"] and run["diverged_epoch"] == 1
    assert run["history"]["epoch"] == [0, 1]
    assert run["final_test_accuracy"] is None and run["final_train_loss"] is None
    json.dumps(run, allow_nan=False)
    aggregate = aggregate_runs([run], 3)
    assert aggregate["diverged_runs"] == 1 and aggregate["diverged_epochs"] == [1]
    assert aggregate["per_epoch"]["test_accuracy"][3]["n"] == 0


def test_full_suite_falls_back_to_bundled_data(monkeypatch, tmp_path):
    spec = replace(convergence.SUITES["full"], max_train=64, max_test=32)
    monkeypatch.setattr(convergence.data, "DEFAULT_FASHION_MNIST", tmp_path / "missing")
    info, _ = load_data(spec, None)
    assert info["key"] == "mnist-subset" and "not found" in info["note"]
    with pytest.raises(FileNotFoundError):  # an explicit directory must exist
        load_data(spec, str(tmp_path / "missing"))


def test_unknown_suite():
    with pytest.raises(ValueError, match="suite"):
        convergence.run("huge", "cpu", None, False)


def test_markdown(smoke):
    text = convergence.markdown(smoke)
    assert text.startswith("## Convergence")
    for name in convergence.PROBLEMS:
        assert f"### {name}:" in text
    for label in convergence.FAMILIES.values():
        assert f"| {label} |" in text
    assert f"epochs to {smoke['target_accuracy']}" in text


def test_plot(smoke, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    paths = convergence.plot(smoke, tmp_path / "plots")
    assert matplotlib.get_backend() == backend
    assert len(paths) == len(smoke["problems"])
    for path in paths:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_on_cuda():
    result = convergence.run("smoke", "cuda", None, False)
    assert result["device"] == "cuda"
    for problem in result["problems"].values():
        assert [row["family"] for row in problem["summary"]] == list(convergence.FAMILIES)
