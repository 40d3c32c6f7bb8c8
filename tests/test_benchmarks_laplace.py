"""The laplace section's verdicts (benchmarks/laplace/report.py) on hand-made results.

Issue 13's goal for ``Laplace.fit``: no slower than the fastest laplace-torch backend that
runs (CPU time), and running where none does. The verdict compares interleaved CPU times
where curvgraph and every peer that ran were timed there, else fresh-process CPU times.
"""

from benchmarks.laplace.report import goals, markdown


def ok(fit_s, cpu_s):
    return {"status": "ok", "fit_s": fit_s, "fit_cpu_s": cpu_s, "curvature_s": fit_s / 2,
            "peak_bytes": 2**20}  # fmt: skip


def failed(reason="RuntimeError: boom"):
    return {"status": "failed", "reason": reason}


def timed(wall, cpu):
    return {"median_s": wall, "cpu_median_s": cpu}


def entry(fresh, interleaved):
    return {"title": "t", "data": "d", "samples": 10, "batch": 5, "fresh": fresh,
            "interleaved": interleaved}  # fmt: skip


def test_verdicts_compare_cpu_times_with_the_fastest_peer():
    result = entry(
        {
            "kron/CurvgraphGGN": ok(9.0, 1.0),
            "kron/AsdlGGN": ok(2.0, 1.5),
            "kron/BackPackGGN": ok(3.0, 1.2),
            "kron/CurvlinopsGGN": failed(),
            "diag/CurvgraphGGN": ok(1.0, 0.9),
            "diag/AsdlGGN": ok(1.0, 0.8),
        },
        {
            "kron/CurvgraphGGN": timed(5.0, 1.1),
            "kron/AsdlGGN": timed(1.0, 1.6),
            "kron/BackPackGGN": timed(1.0, 1.3),
            "diag/CurvgraphGGN": timed(1.0, 0.95),
            "diag/AsdlGGN": timed(1.0, 0.7),
        },
    )
    verdict = goals(result)
    # wall times favour the peers (a busy machine); CPU times decide
    assert verdict["kron"]["verdict"] == "met"
    assert verdict["kron"]["fastest"] == "BackPackGGN"
    assert verdict["kron"]["curvgraph"]["source"] == "interleaved"
    assert abs(verdict["kron"]["cpu_ratio"] - 1.1 / 1.3) < 1e-12
    assert verdict["diag"]["verdict"] == "not met"
    assert abs(verdict["diag"]["cpu_ratio"] - 0.95 / 0.7) < 1e-12
    text = markdown({"config": {"preset": "x", "samples": 10, "threads": 1,
                                "interleave_cap_s": 1, "repeats": 1},
                     "environment": {}, "problems": {"p": result}})  # fmt: skip
    assert (
        "| kron | 5 (1.1), interleaved | BackPackGGN | 1 (1.3), interleaved | 0.846x | met |"
        in text
    )


def test_fresh_times_when_a_candidate_was_not_interleaved_and_none_or_only_curvgraph_runs():
    result = entry(
        {
            "kron/CurvgraphGGN": ok(200.0, 150.0),
            "kron/AsdlGGN": failed(),
            "diag/CurvgraphGGN": ok(200.0, 90.0),
            "diag/AsdlGGN": ok(20.0, 10.0),
        },
        {"diag/AsdlGGN": timed(20.0, 11.0)},  # curvgraph's fit was over the cap
    )
    verdict = goals(result)
    assert verdict["kron"]["verdict"] == "met: only curvgraph runs"
    assert verdict["kron"]["peers_ran"] == []
    assert verdict["diag"]["curvgraph"]["source"] == "fresh"
    assert verdict["diag"]["fastest_times"] == {"wall_s": 20.0, "cpu_s": 10.0, "source": "fresh"}
    assert verdict["diag"]["verdict"] == "not met"
    # a peer over the cap, slower than curvgraph in its fresh process, leaves the rounds to decide
    slow = entry(
        {"diag/CurvgraphGGN": ok(2.0, 0.5), "diag/AsdlGGN": ok(1.0, 0.3),
         "diag/CurvlinopsGGN": ok(500.0, 200.0)},
        {"diag/CurvgraphGGN": timed(1.0, 0.3), "diag/AsdlGGN": timed(1.0, 0.4)},
    )  # fmt: skip
    assert goals(slow)["diag"]["curvgraph"]["source"] == "interleaved"
    assert goals(slow)["diag"]["verdict"] == "met"
    slow["fresh"]["diag/CurvlinopsGGN"] = ok(1.5, 0.2)  # faster fresh: fresh times for all
    assert goals(slow)["diag"]["curvgraph"]["source"] == "fresh"
    assert goals(slow)["diag"]["fastest"] == "CurvlinopsGGN"
    failing = entry({"diag/CurvgraphGGN": failed(), "diag/AsdlGGN": ok(1.0, 1.0)}, {})
    assert goals(failing)["diag"]["verdict"] == "not met: curvgraph fails"
    text = markdown({"config": {"preset": "x", "samples": 10, "threads": 1,
                                "interleave_cap_s": 1, "repeats": 1},
                     "environment": {}, "problems": {"a": result, "b": failing}})  # fmt: skip
    assert "| kron | 200 (150), fresh | none runs | - | - | met: only curvgraph runs |" in text
    assert "| diag | - | AsdlGGN | - | - | not met: curvgraph fails |" in text
