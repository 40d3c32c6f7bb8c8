"""The fallback benchmark section on its tiny configuration (no timing assertions).

Checks the structure of the results, that every ratio is a positive finite number, that the
two graphs really use different rules for the activation and agree on the results, and that
the suite registers, reports and plots the section.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` (CI runs `python -m pytest` from the root)
    sys.path.insert(0, str(ROOT))

from benchmarks import fallback, suite  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fallback")
    argv = ["--suite", "smoke", "--sections", "fallback", "--out", str(out), "--no-progress"]
    return suite.main(argv + ["--threads", "1"]), out


def test_section_is_registered_and_reported(smoke):
    results, out = smoke
    assert "fallback" in suite.SECTIONS
    on_disk = json.loads((out / "results.json").read_text())
    section = on_disk["sections"]["fallback"]
    assert section["status"] == "ok", section.get("error")
    assert section["plots"] == ["fallback.png"] and (out / "fallback.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "autograd fallback vs hand-written rules" in report
    assert "| tanh |" in report and "| gelu |" in report and "| softplus |" in report


def test_rows_ratios_and_agreement(smoke):
    results, _ = smoke
    result = results["sections"]["fallback"]["result"]
    expected = {**fallback.CONFIGS["smoke"], "model": "784-H-act-H-act-10", "dtype": "float32"}
    assert result["config"] == expected
    assert [r["activation"] for r in result["rows"]] == list(fallback.ACTIVATIONS)
    for row in result["rows"]:
        assert "FallbackRule" in row["rules"]["fallback"]
        assert "FallbackRule" not in row["rules"]["hand-written"]
        assert set(row["timings"]) == {
            "gradient",
            "exact/hand-written",
            "exact/fallback",
            "hbp/hand-written",
            "hbp/fallback",
        }
        assert len(row["ratios"]) == 6
        assert all(math.isfinite(v) and v > 0 for v in row["ratios"].values())
        # the same blocks from both rules (float32 round-off only)
        assert row["max_difference"]["exact"] < 1e-4 and row["max_difference"]["hbp"] < 1e-4
    table = fallback.markdown(result)
    assert table.count("\n| ") == 1 + len(fallback.ACTIVATIONS)  # header + one row each
