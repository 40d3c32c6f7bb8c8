"""Progress bars (curvgraph.progress): switched by argument, module setting and environment.

Each check captures stderr: a bar that is on prints its description there, one that is off
(or auto, stderr not being a terminal under pytest) prints nothing; and the results with a
bar equal those without (bars only count).
"""

from __future__ import annotations

import pytest
import torch

import curvgraph
from curvgraph import progress
from curvgraph.curvature.analysis import top_eigenvalues
from curvgraph.curvature.spectral import spectral_density


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    """Every test starts in auto mode with no environment setting, and leaves it so."""
    monkeypatch.delenv(progress.ENVIRONMENT_VARIABLE, raising=False)
    progress.set_progress(None)
    yield
    progress.set_progress(None)


def _graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Sigmoid()
    ).double()
    model.append(torch.nn.Linear(4, 3).double())
    cg = curvgraph.trace(model)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    out = cg(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    return cg, loss, out


def _dense(curv):
    return {name: block.to_dense() for name, block in curv.items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hbp", "kflr", "diag"])
def test_curvature_walk_bar_on_off_same_blocks(method, capsys):
    cg, loss, out = _graph()
    curvature = "hessian" if method == "hbp" else "ggn"
    capsys.readouterr()
    off = _dense(cg.curvature(loss, out, curvature, method, progress=False))
    assert capsys.readouterr().err == ""
    on = _dense(cg.curvature(loss, out, curvature, method, progress=True))
    err = capsys.readouterr().err
    assert f"curvature {method} {curvature}" in err and "node" in err, err
    _assert_same(off, on)
    auto = _dense(cg.curvature(loss, out, curvature, method))  # auto: stderr is no terminal
    assert capsys.readouterr().err == ""
    _assert_same(off, auto)


def test_module_setting_and_environment(capsys, monkeypatch):
    cg, loss, out = _graph()
    capsys.readouterr()
    monkeypatch.setenv(progress.ENVIRONMENT_VARIABLE, "1")
    cg.curvature(loss, out, "ggn", "kfac", mc_samples=1)
    assert "curvature kfac ggn" in capsys.readouterr().err
    progress.set_progress(False)  # the module setting wins over the environment
    cg.curvature(loss, out, "ggn", "kfac", mc_samples=1)
    assert capsys.readouterr().err == ""
    cg.curvature(loss, out, "ggn", "kfac", mc_samples=1, progress=True)  # the argument wins
    assert "curvature kfac ggn" in capsys.readouterr().err
    progress.set_progress(None)
    monkeypatch.setenv(progress.ENVIRONMENT_VARIABLE, "off")
    cg.curvature(loss, out, "ggn", "kfac", mc_samples=1)
    assert capsys.readouterr().err == ""
    curvgraph.set_progress(True)
    cg.curvature(loss, out, "ggn", "kfac", mc_samples=1)
    assert "curvature kfac ggn" in capsys.readouterr().err


def test_bad_switches_are_refused(monkeypatch):
    cg, loss, out = _graph()
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        cg.curvature(loss, out, "ggn", "hbp", progress="yes")
    with pytest.raises(TypeError, match="set_progress"):
        progress.set_progress(1)
    monkeypatch.setenv(progress.ENVIRONMENT_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="CURVGRAPH_PROGRESS='sometimes'"):
        cg.curvature(loss, out, "ggn", "hbp")


def test_lanczos_and_slq_bars_same_results(capsys):
    cg, loss, out = _graph()
    curv = cg.curvature(loss, out, "ggn", "hbp")
    capsys.readouterr()
    off = top_eigenvalues(curv, 2, generator=0, progress=False)
    assert capsys.readouterr().err == ""
    on = top_eigenvalues(curv, 2, generator=0, progress=True)
    err = capsys.readouterr().err
    assert "Lanczos" in err and "step" in err, err
    _assert_same(off, on)
    slq_off = spectral_density(curv, probes=2, steps=5, generator=1, progress=False)
    assert capsys.readouterr().err == ""
    slq_on = spectral_density(curv, probes=2, steps=5, generator=1, progress=True)
    assert "SLQ" in capsys.readouterr().err
    _assert_same({k: v.nodes for k, v in slq_off.items()}, {k: v.nodes for k, v in slq_on.items()})
    _assert_same(
        {k: v.weights for k, v in slq_off.items()}, {k: v.weights for k, v in slq_on.items()}
    )
    # through the blocks' own method, as users call it
    _assert_same(off, {k: v for k, v in curv.top_eigenvalues(2, generator=0).items()})
    assert capsys.readouterr().err == ""


def test_seed_tutorial_training_bar(capsys):
    from curvgraph.examples import seed_tutorial

    capsys.readouterr()
    quiet = seed_tutorial.train(epochs=1, batch_size=2000, progress=False)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith("Epoch [1/1], Iter. [1/4], Loss: ")
    shown = seed_tutorial.train(epochs=1, batch_size=2000, progress=True)
    captured = capsys.readouterr()
    assert "seed tutorial" in captured.err and "4/4" in captured.err, captured.err
    assert captured.out.startswith("Epoch [1/1], Iter. [1/4], Loss: ")  # lines unchanged
    assert quiet == shown
