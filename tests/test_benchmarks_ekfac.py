"""The ekfac benchmark section: its rows, table and plot on mnist_mlp (one round).

The round takes about a minute on 2 loaded cores (curvlinops' type-2 fit alone is seconds):
``CURVGRAPH_SLOW_TESTS=1`` runs it; the registration test always runs.
"""

import os

import pytest

from benchmarks import ekfac
from benchmarks.ekfac.candidates import CANDIDATES
from benchmarks.suite import parse_args
from benchmarks.suite.sections import RUNNERS

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CURVGRAPH_SLOW_TESTS") != "1",
    reason="slow (a minute): set CURVGRAPH_SLOW_TESTS=1",
)
def test_section_rows_table_and_plot(tmp_path):
    pytest.importorskip("curvlinops")
    result = ekfac.run(repeats=1, warmup=0, problems=["mnist_mlp"], memory=False)
    rows = result["problems"]["mnist_mlp"]["rows"]
    assert set(rows) == set(CANDIDATES)
    for name, row in rows.items():
        assert row["median_s"] > 0 and row["cpu_median_s"] >= 0, name
    assert rows["gradient"]["ratio_to_gradient"] == 1.0
    table = ekfac.markdown(result)
    assert "| mnist_mlp | 128 | cg_fit_mc |" in table and "curvlinops_solve" in table
    (path,) = ekfac.plot(result, tmp_path)
    assert path.stat().st_size > 0


def test_the_section_is_registered_and_opt_in():
    assert "ekfac" in RUNNERS
    assert "ekfac" not in parse_args(["--suite", "quick"]).sections
    assert parse_args(["--suite", "quick", "--sections", "ekfac"]).sections == ["ekfac"]
