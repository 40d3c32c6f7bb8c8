"""The foundation benchmark runs end to end on a tiny configuration and writes what it promises.

No timing thresholds: only the structure of ``results.json``, that every ratio is a positive
finite number, and the helpers' contracts.
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

from benchmarks import foundation, timing  # noqa: E402

TIMING_KEYS = {"median_s", "q25_s", "q75_s", "min_s", "times", "repeats", "warmup", "contention"}
TIMING_KEYS |= {"cpu_median_s", "cpu_times"}  # the process's CPU time beside the wall time
MEMORY_KEYS = {"kind", "peak_bytes", "baseline_bytes", "delta_bytes"}
PROBLEM_KEYS = {
    "title",
    "model",
    "batch_size",
    "num_parameters",
    "loss",
    "timings",
    "memory",
    "contention",
    "ratios",
    "cg_iterations",
    "blocks",
    "parameters_finite_after_steps",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Both problems, batch size 8, one timed call, one thread: a few seconds on a CPU."""
    out = tmp_path_factory.mktemp("foundation")
    argv = ["--repeats", "1", "--warmup", "0", "--batch-size", "8", "--threads", "1"]
    argv += ["--no-progress", "--out", str(out)]
    threads = torch.get_num_threads()
    results = foundation.main(argv)
    assert torch.get_num_threads() == threads  # --threads is undone after the run
    return results, out


def test_files_written(tiny_run):
    results, out = tiny_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    report = (out / "report.md").read_text()
    for name in foundation.PROBLEMS:
        assert f"### {name}:" in report
    assert "| ratio (median / median) | linear | mlp |" in report
    assert (out / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_schema(tiny_run):
    results, _ = tiny_run
    assert results["benchmark"] == "foundation"
    assert results["schema_version"] == foundation.SCHEMA_VERSION
    config = results["config"]
    assert (config["repeats"], config["warmup"], config["threads"]) == (1, 0, 1)
    assert config["problems"] == list(foundation.PROBLEMS)
    env = results["environment"]
    for key in ("torch", "python", "platform", "device", "device_name", "torch_num_threads"):
        assert env[key] not in (None, "")
    assert "git_commit" in env and "load_average_end" in env
    assert results["method"]["memory_kind"] in timing.MEMORY_KINDS
    assert results["definitions"]["measurements"] == foundation.MEASUREMENTS
    assert results["definitions"]["ratios"] == foundation.RATIOS
    assert set(results["problems"]) == set(foundation.PROBLEMS)
    for result in results["problems"].values():
        assert set(result) == PROBLEM_KEYS
        assert result["batch_size"] == 8
        assert set(result["timings"]) == set(foundation.MEASUREMENTS)
        assert set(result["memory"]) == set(foundation.MEASUREMENTS)
        for stats in result["timings"].values():
            assert set(stats) == TIMING_KEYS
            assert len(stats["times"]) == len(stats["cpu_times"]) == 1
            assert all(t > 0 for t in stats["times"])
            assert stats["q25_s"] <= stats["median_s"] <= stats["q75_s"]
            if stats["contention"] is not None:
                assert 0 <= stats["contention"]["others_fraction"]
        for memory in result["memory"].values():
            assert set(memory) == MEMORY_KEYS
            assert memory["kind"] == results["method"]["memory_kind"]
            assert memory["delta_bytes"] >= 0 and memory["peak_bytes"] >= 0
        assert result["parameters_finite_after_steps"] is True
        assert math.isfinite(result["loss"])
        assert set(result["cg_iterations"]) == set(result["blocks"])
        assert all(
            1 <= it <= foundation.CG_NEWTON["cg_maxiter"] for it in result["cg_iterations"].values()
        )


def test_ratios_positive_and_finite(tiny_run):
    results, _ = tiny_run
    for result in results["problems"].values():
        assert set(result["ratios"]) == set(foundation.RATIOS)
        for key, value in result["ratios"].items():
            assert math.isfinite(value) and value > 0, key
            numerator, denominator = key.split("/")
            medians = (
                result["timings"][numerator]["median_s"],
                result["timings"][denominator]["median_s"],
            )
            assert value == pytest.approx(medians[0] / medians[1])


def test_parameters_untouched(tiny_run):
    """Steps restore the parameters: a rerun sees the same initial loss."""
    results, _ = tiny_run
    torch.manual_seed(foundation.SEED)
    model = foundation.PROBLEMS["linear"].build()
    x, y = foundation.load_batch(8, torch.device("cpu"))
    loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert results["problems"]["linear"]["loss"] == pytest.approx(loss, rel=1e-6)


def test_parse_args():
    args = foundation.parse_args([])
    assert (args.repeats, args.warmup, args.device) == (20, 3, "cpu")
    assert args.problems == list(foundation.PROBLEMS)
    args = foundation.parse_args(["--quick", "--problems", "mlp"])
    assert (args.repeats, args.warmup, args.problems) == (3, 1, ["mlp"])
    with pytest.raises(SystemExit):
        foundation.parse_args(["--problems", "resnet"])
    with pytest.raises(SystemExit):
        foundation.parse_args(["--repeats", "0"])


def test_measure_runs_setup_outside_and_passes_its_value():
    calls = []

    def setup():
        calls.append("setup")
        return len(calls)

    def fn(value):
        calls.append(("fn", value))

    stats = timing.measure(fn, repeats=3, warmup=2, device="cpu", setup=setup)
    assert len(stats["times"]) == 3 and (stats["repeats"], stats["warmup"]) == (3, 2)
    assert calls[:2] == ["setup", ("fn", 1)] and len(calls) == 10


def test_measure_interleaved_goes_round_by_round():
    calls = []
    plan = {name: (lambda name=name: calls.append(name), None) for name in "ab"}
    seen = []
    results = timing.measure_interleaved(plan, repeats=2, warmup=1, callback=seen.append)
    assert calls == ["a", "b"] * 3 and seen == calls
    assert all(len(results[name]["times"]) == 2 for name in "ab")
    with pytest.raises(ValueError):
        timing.measure(lambda: None, repeats=0)


def test_peak_memory_and_environment():
    result = timing.peak_memory(lambda: torch.ones(2**22).sum(), "cpu")
    assert set(result) == MEMORY_KEYS and result["kind"] in timing.MEMORY_KINDS
    assert result["delta_bytes"] == max(result["peak_bytes"] - result["baseline_bytes"], 0)
    env = timing.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert timing.ratio(1.0, 0.0) != timing.ratio(1.0, 0.0)  # NaN for a zero denominator
    assert timing.ratio(3.0, 2.0) == 1.5
