"""The ``language_models`` benchmark section on its smoke preset (a tiny nanoGPT, seconds).

Checks the structure of what the section writes (JSON, Markdown, PNG) and its registration
in the suite; never a timing.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import language_models, suite  # noqa: E402
from benchmarks.language_models.candidates import CANDIDATES  # noqa: E402
from benchmarks.language_models.models import MODELS, build  # noqa: E402


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """The section run once through the suite (``--suite smoke --sections language_models``)."""
    out = tmp_path_factory.mktemp("lm")
    argv = ["--suite", "smoke", "--sections", "language_models", "--out", str(out)]
    results = suite.main(argv + ["--no-progress", "--threads", "1"])
    return out, results


def test_suite_registration():
    assert "language_models" in suite.SECTIONS
    assert suite.parse_args(["--suite", "language_models"]).sections == ["language_models"]
    for name in ("quick", "full"):  # the quick and full suites do not run it by default
        assert "language_models" not in suite.parse_args(["--suite", name]).sections


def test_section_result_structure(section):
    out, results = section
    entry = results["sections"]["language_models"]
    assert entry["status"] == "ok", entry.get("error")
    assert entry["plots"] == ["language_models.png"]
    result = entry["result"]
    assert set(result["models"]) == set(language_models.PRESETS["smoke"]["models"])
    model = result["models"]["nanogpt-tiny"]
    assert [r["key"] for r in model["rows"]] == [c.key for c in CANDIDATES]
    for row in model["rows"]:
        assert row["status"] in ("ok", "n/a")
        if row["status"] == "ok":
            assert row["median_s"] > 0 and row["cpu_median_s"] >= 0
            assert row["ratio"] > 0
        else:
            assert row["reason"]
    gradient = model["rows"][0]
    assert gradient["key"] == "gradient" and gradient["ratio"] == pytest.approx(1.0)
    # fresh-process memory: the gradient and kfac in this preset
    for method in ("gradient", "kfac"):
        mem = model["memory"][method]
        assert mem["status"] == "ok", mem
        assert mem["peak_bytes"] >= mem["rss_imports_bytes"] > 0
        assert mem["call"]["kind"] in ("cpu_peak_rss", "cpu_maxrss_delta")
        tensors = mem["tensors"]  # the same call's tensors (torch.profiler), fresh process
        assert tensors["status"] == "ok", tensors
        assert tensors["call"]["kind"] == "cpu_tensor_peak"
        assert tensors["call"]["peak_bytes"] > tensors["call"]["live_bytes"] > 0
    assert "dense_vxv" in model["memory"]["kfac"]["largest_tensor"]
    kfac = next(r for r in model["rows"] if r["key"] == "kfac pass")
    assert kfac["tensor_memory_ratio"] > 0
    assert model["goals"][-1]["goal"].startswith("kfac tensor peak")
    floors = model["floors"]
    for key in ("kfac_pass", "diag_pass", "exact_product"):
        assert floors[key] > 0
    assert model["blocks"]["curvgraph"] >= model["blocks"]["curvlinops_kfac"] > 0
    assert [g["goal"] for g in model["goals"]][0] == "kfac pass <= 1.5x gradient"
    assert all("status" in g for g in model["goals"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sections"]["language_models"]["status"] == "ok"
    assert "## Language models (smoke)" in (out / "report.md").read_text()


def test_section_files(section, tmp_path):
    _, results = section
    result = results["sections"]["language_models"]["result"]
    paths = language_models.write(result, tmp_path)
    assert [p.name for p in paths] == [
        "language_models.json",
        "language_models.md",
        "language_models.png",
    ]
    data = json.loads(paths[0].read_text())
    assert data["suite"] == "smoke" and "environment" in data
    text = paths[1].read_text()
    assert "| candidate | library |" in text and "| goal | value | floor | status |" in text
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floors_count_every_block():
    from benchmarks.language_models.floors import operation_floors

    built = build(MODELS["nanogpt-tiny"])
    floors = operation_floors(built)
    assert floors["exact_product_blocks"] == len(dict(built.model.named_parameters()))
    # every block's tangent and backward cover at least its own layer: above the kfac floor
    assert floors["exact_product"] > floors["kfac_pass"] > 0
    assert floors["gradient_flops"] == floors["forward_flops"] + floors["backward_flops"]
