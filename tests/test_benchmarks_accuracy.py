"""The accuracy benchmark runs its smoke suite (seconds) and returns what it promises.

Checks the schema of ``run("smoke", "cpu", False)``, that every error is finite and >= 0,
the N = 1 identity (HBP and KFLR equal the exact block on linear layers), that the exact
references agree with ``torch.func``, and that ``markdown`` and ``plot`` produce output.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (CI runs `python -m pytest` from the root)
    sys.path.insert(0, str(ROOT))

from benchmarks import accuracy  # noqa: E402

TOP_KEYS = {
    "schema_version",
    "benchmark",
    "suite",
    "device",
    "dtype",
    "threads",
    "config",
    "data",
    "error_definition",
    "peers",
    "references",
    "methods",
    "problems",
    "records",
    "summary",
    "identities",
    "elapsed_s",
}
AGGREGATES = ("median", "max", "blockdiag", "blockdiag_diag")


@pytest.fixture(scope="module")
def result():
    return accuracy.run("smoke", "cpu", False)


def _finite_nonnegative(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0


def test_schema(result):
    assert set(result) == TOP_KEYS
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # strict JSON round trip
    config = accuracy.SUITES["smoke"]
    assert result["suite"] == "smoke" and result["device"] == "cpu"
    assert result["dtype"] == "float64"
    assert list(result["problems"]) == list(config["problems"])
    assert {"hbp-ggn", "hbp-hessian", "kflr", "kfac-1", "diag", "sqrt-mc-1"} <= set(
        result["methods"]
    )
    expected = {
        (p, n, s)
        for p in config["problems"]
        for n in config["batch_sizes"]
        for s in config["seeds"]
    }
    assert {(r["problem"], r["batch_size"], r["seed"]) for r in result["records"]} == expected
    for record in result["records"]:
        assert set(record["methods"]) == set(result["methods"])
        params = result["problems"][record["problem"]]["parameters"]
        assert set(record["linear_blocks"]) <= set(params)
        for key, res in record["methods"].items():
            assert res["status"] in ("ok", "n/a"), key
            if res["status"] == "n/a":
                assert res["reason"], key  # never silently dropped
                continue
            assert set(res["blocks"]) == set(params), key


def test_errors_finite_and_nonnegative(result):
    for record in result["records"]:
        for check in record["checks"].values():
            assert _finite_nonnegative(check)
        for key, res in record["methods"].items():
            if res["status"] != "ok":
                continue
            for agg in AGGREGATES:
                assert _finite_nonnegative(res[agg]), (key, agg)
            for block in res["blocks"].values():
                assert _finite_nonnegative(block["error"]), key
                assert _finite_nonnegative(block["error_diag"]), key
            assert res["max"] >= res["median"]
    for by_method in result["summary"].values():
        for by_n in by_method.values():
            for entry in by_n.values():
                if entry["status"] == "ok":
                    assert all(_finite_nonnegative(entry[agg]) for agg in AGGREGATES)


def test_references_agree_with_torch_func(result):
    for record in result["records"]:
        for name, value in record["checks"].items():
            assert value < 1e-10, (record["problem"], record["batch_size"], name)


def test_identity_at_batch_size_one_on_linear_layers(result):
    """HBP (every curvature) and KFLR equal the exact block for N = 1 on ``nn.Linear``."""
    rows = result["identities"]
    methods = {r["method"] for r in rows}
    assert {"hbp-ggn", "hbp-ggn-expect", "hbp-hessian", "hbp-pch-abs", "kflr"} <= methods
    for row in rows:
        assert row["blocks"], row
        assert row["max_error"] < 1e-10, row
        assert row["holds"]
    for record in result["records"]:
        if record["batch_size"] != 1:
            continue
        for key in ("hbp-ggn", "hbp-hessian", "kflr"):
            blocks = record["methods"][key]["blocks"]
            for name in record["linear_blocks"]:
                assert blocks[name]["error"] < 1e-10, (key, name)


def test_approximations_are_not_exact_for_larger_batches(result):
    """The identity is specific to N = 1: with N = 8 the batch averages differ."""
    summary = result["summary"][result["config"]["problems"][0]]
    assert summary["hbp-ggn"]["8"]["blockdiag"] > 1e-8
    assert summary["sqrt"]["8"]["blockdiag"] < 1e-10  # exact factors: exact for every N
    assert summary["diag"]["8"]["blockdiag_diag"] < 1e-10  # the exact diagonal


def test_markdown(result):
    text = accuracy.markdown(result)
    assert text.startswith("## ")
    assert "\n# " not in text  # no top-level title
    for problem in result["problems"]:
        assert f"### {problem}:" in text
    for method in result["methods"].values():
        assert method["label"] in text
    assert "| method | reference | N=1 block-diag | N=8 block-diag |" in text
    assert "Identity at N = 1" in text


def test_plot(result, tmp_path):
    backend = matplotlib.get_backend()
    paths = accuracy.plot(result, tmp_path / "plots")
    assert paths and all(p.suffix == ".png" for p in paths)
    for path in paths:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend  # the global backend is left alone


def test_unknown_suite():
    with pytest.raises(ValueError, match="suite"):
        accuracy.run("nope", "cpu", False)
