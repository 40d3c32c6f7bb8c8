"""The operators benchmark section: its rows, table and plot on mnist_mlp (one round)."""

import pytest

from benchmarks import operators
from benchmarks.suite import parse_args
from benchmarks.suite.sections import RUNNERS


def test_section_rows_table_and_plot(tmp_path):
    pytest.importorskip("curvlinops")
    result = operators.run(repeats=1, warmup=0, problems=["mnist_mlp"], memory=False)
    rows = result["problems"]["mnist_mlp"]["rows"]
    assert set(rows) == set(operators.run.__globals__["CANDIDATES"])
    for name, row in rows.items():
        assert row["median_s"] > 0 and row["cpu_median_s"] >= 0, name
    assert rows["gradient"]["ratio_to_gradient"] == 1.0
    table = operators.markdown(result)
    assert "| mnist_mlp | 128 | cg_ggn |" in table and "curvlinops_hessian" in table
    (path,) = operators.plot(result, tmp_path)
    assert path.stat().st_size > 0


def test_the_section_is_registered_and_opt_in():
    assert "operators" in RUNNERS
    assert "operators" not in parse_args(["--suite", "quick"]).sections
    assert parse_args(["--suite", "quick", "--sections", "operators"]).sections == ["operators"]
