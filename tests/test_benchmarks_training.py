"""The training benchmark section: its bookkeeping and a tiny end-to-end run.

The bookkeeping is checked on hand-written histories (the answers are known); the run on a
256-sample slice of the bundled MNIST subset, one epoch, two seeds.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.training import config, loop, markdown, plot, runner


def history(accuracies, times, epochs, losses):
    return {
        "epoch": epochs,
        "time_s": times,
        "cpu_s": [t / 2 for t in times],
        "test_accuracy": accuracies,
        "train_loss": losses,
    }


def test_to_target_is_the_first_evaluation_at_or_above_it():
    h = history([0.1, 0.5, 0.9, 0.8, 0.95], [0, 1, 2, 3, 4], [0, 0.5, 1, 1.5, 2], [None] * 5)
    assert runner.to_target(h, 0.9) == {"time_s": 2, "cpu_s": 1, "epoch": 1}
    assert runner.to_target(h, 0.99)["time_s"] == math.inf


def test_epoch_losses_average_the_windows_of_each_epoch():
    h = history([0] * 5, [0] * 5, [0, 0.5, 1.0, 1.5, 2.0], [None, 4.0, 2.0, 1.0, 3.0])
    assert runner.epoch_losses(h) == [3.0, 2.0]


def test_stats_count_unreached_seeds_as_infinitely_slow():
    stats = runner._stats([1.0, math.inf, 3.0])
    assert stats == {"median": 3.0, "min": 1.0, "max": 3.0, "reached": 2, "seeds": 3}
    assert runner._stats([math.inf, math.inf, 1.0])["median"] is None


def test_every_problem_has_baseline_grids_cgnewton_settings_and_a_goal():
    for name in config.PROBLEMS:
        families = [c["family"] for c in config.configs(name)]
        assert families.count("sgd") >= 3 and families.count("adam") >= 3
        assert "cgnewton" in families and name in config.GOALS


@pytest.fixture
def tiny(monkeypatch):
    problem = config.Problem(
        "tiny",
        "MLP 784-8-10 on 256 digits",
        lambda: config.nn.Sequential(
            config.nn.Linear(784, 8), config.nn.Sigmoid(), config.nn.Linear(8, 10)
        ),
        "mnist-subset",
        batch_size=64,
        epochs=1,
        target=0.2,
        flatten=True,
        max_train=256,
        max_test=128,
        evals_per_epoch=2,
    )
    monkeypatch.setitem(config.PROBLEMS, "tiny", problem)
    monkeypatch.setitem(runner.PROBLEMS, "tiny", problem)
    monkeypatch.setitem(config.SGD_LRS, "tiny", (0.1,))
    monkeypatch.setitem(config.ADAM_LRS, "tiny", (1e-2,))
    hbp = config._cgnewton("CG-Newton hbp", "ggn", "hbp", **config.SEED_CG, curvature_every=2)
    sub = config._cgnewton("CG-Newton exact LM sub", "ggn", "exact", **config.LM_CG, sub_batch=16)
    monkeypatch.setitem(config.CGNEWTON, "tiny", [hbp, sub])
    monkeypatch.setitem(config.GOALS, "tiny", config.GOALS["mnist_mlp"])
    monkeypatch.setitem(runner.GOALS, "tiny", config.GOALS["mnist_mlp"])
    return problem


def test_a_tiny_run_end_to_end(tiny, tmp_path):
    result = runner.run(["tiny"], seeds=(0, 1), progress=False)
    problem = result["problems"]["tiny"]
    assert [e["config"]["label"] for e in problem["entries"]] == [
        "SGD lr 0.1",
        "Adam lr 0.01",
        "CG-Newton hbp",
        "CG-Newton exact LM sub",
    ]
    for entry in problem["entries"]:
        for run in entry["runs"]:
            h = run["history"]
            assert h["epoch"] == [0.0, 0.5, 1.0]  # 4 steps, evaluated after 2 and 4
            assert h["time_s"][0] == 0 < h["time_s"][1] < h["time_s"][2]
            assert all(0 <= a <= 1 for a in h["test_accuracy"])
    lm = problem["entries"][-1]["runs"][0]["history"]["alpha"]
    assert lm[0] == 0.02 and lm[-1] != 0.02  # LM adapted the damping
    assert [g.get("label") for g in problem["goals"][:-1]] == [
        "CG-Newton hbp",
        "CG-Newton exact LM sub",
    ]
    floor = problem["floor"]  # a time-to-target goal: the per-step floor is measured
    cpu = {name: part["cpu_ms"] for name, part in floor["parts"].items()}
    assert all(v > 0 for v in cpu.values())
    expected = (cpu["gradient"] + min(cpu["product"], cpu["cached_solve"])) / cpu["adam_step"]
    assert floor["floor_ratio_equal_steps"] == pytest.approx(expected)
    assert problem["measured"]["wall_time_s"] > 0
    text = markdown(json.loads(json.dumps(result)))  # what the JSON file holds
    assert "### tiny" in text and "| CG-Newton hbp |" in text
    assert "Per-step floor (batch 64" in text
    assert plot(result, tmp_path)[0].stat().st_size > 10_000


def test_keep_previous_adds_the_problems_not_rerun_in_report_order():
    new = {"seeds": [0], "problems": {"fashion_mlp": {"n": "new"}, "mnist_mlp": {"n": "new"}}}
    old = {"problems": {n: {"n": "old"} for n in ("mnist_mlp", "fashion_mlp", "fashion_cnn")}}
    merged = runner.keep_previous(new, old)
    assert list(merged["problems"]) == ["mnist_mlp", "fashion_mlp", "fashion_cnn"]
    assert [p["n"] for p in merged["problems"].values()] == ["new", "new", "old"]
    assert merged["kept_from_previous_run"] == ["fashion_cnn"] and merged["seeds"] == [0]


def test_sub_batch_steps_take_the_curvature_of_the_first_rows(tiny, monkeypatch):
    seen = []
    original = loop.sub_batch_curvature

    def spy(cg, loss_fn, inputs, targets, size, *args, **kwargs):
        seen.append((len(inputs), size))
        return original(cg, loss_fn, inputs, targets, size, *args, **kwargs)

    monkeypatch.setattr(loop, "sub_batch_curvature", spy)
    data = runner.load_data(tiny)
    loop.train(tiny, config.configs("tiny")[-1], 0, data)
    assert seen == [(64, 16)] * 4


def entry(family, label, time_s, accuracy, losses):
    stats = {"median": time_s, "min": time_s, "max": time_s, "reached": 1, "seeds": 1}
    final = {"median": accuracy, "min": accuracy, "max": accuracy, "reached": 1, "seeds": 1}
    cpu = dict(stats, median=None if time_s is None else time_s / 2)
    summary = {"time_to_target_s": stats, "cpu_to_target_s": cpu, "final_test_accuracy": final}
    summary["train_loss_per_epoch"] = losses
    return {"config": {"family": family, "label": label}, "summary": summary}


def test_cnn_goal_needs_sgd_to_fail_adam_to_train_and_lower_loss_every_epoch():
    sgd = entry("sgd", "SGD", None, 0.1, [2.3, 2.3])
    adam = entry("adam", "Adam", None, 0.72, [2.0, 1.0])
    better = entry("cgnewton", "better", 5.0, 0.78, [1.9, 0.5])
    once = entry("cgnewton", "once", 5.0, 0.78, [2.1, 0.5])
    rows = runner.goal("fashion_cnn", [sgd, adam, better, once])
    assert rows[-1] == {"best_adam": "Adam", "best_sgd": "SGD"}
    assert rows[0]["met"] and rows[0]["adam_trains"] and rows[0]["sgd_fails"]
    assert not rows[1]["met"] and rows[1]["lower_loss_epochs"] == 1
    trained = entry("sgd", "SGD", None, 0.6, [2.0, 1.0])  # an SGD that trains: not met
    assert not runner.goal("fashion_cnn", [trained, adam, better])[0]["met"]


def test_time_goal_is_the_ratio_to_the_best_adam():
    fast, slow = entry("adam", "fast", 1.0, 0.9, []), entry("adam", "slow", 3.0, 0.9, [])
    rows = runner.goal(
        "mnist_mlp",
        [entry("sgd", "SGD", 2.0, 0.9, []), slow, fast, entry("cgnewton", "cg", 1.5, 0.9, [])],
    )
    assert rows[0]["ratio"] == 1.5 and rows[0]["met"] and rows[-1]["best_adam"] == "fast"
    assert rows[0]["cpu_ratio"] == 1.5  # 0.75 s / 0.5 s
    late = runner.goal(
        "mnist_mlp", [fast, entry("sgd", "S", 2.0, 0.9, []), entry("cgnewton", "c", 2.5, 0.9, [])]
    )
    assert late[0]["ratio"] == 2.5 and not late[0]["met"]
