"""``curvgraph.inspect``: the coverage and cost report, its CLI, networkx export and plot."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.__main__ import load_model, main


class Small(nn.Module):
    """A conv, an op without a rule (LocalResponseNorm), a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LocalResponseNorm(2)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        return self.fc(x.flatten(1))


def _node(report, name):
    return next(n for n in report.nodes if n.name == name)


def test_report_lists_ops_rules_blocks_sizes_and_methods():
    report = curvgraph.inspect(Small(), torch.randn(2, 3, 8, 8), fallback=True)
    conv, norm, fc = _node(report, "conv"), _node(report, "norm"), _node(report, "fc")
    assert (conv.op, conv.kind, conv.rule) == ("torch.nn.Conv2d", "hand-written", "conv2d")
    assert (norm.op, norm.kind) == ("torch.nn.LocalResponseNorm", "fallback")
    assert conv.parameters == ["conv.weight", "conv.bias"]
    assert conv.output_shape == (2, 4, 6, 6)
    # dense HBP matrices: 144 features into the norm, ReLU and linear layer, 10 outputs
    assert norm.hbp_sizes == {"arg0": 144}
    assert fc.hbp_sizes == {"input": 144, "output": 10}
    assert report.largest_hbp_matrix == 144
    weight = report.parameters["fc.weight"]
    assert (weight.shape, weight.numel, weight.kronecker) == ((10, 144), 1440, (10, 144))
    assert weight.hbp_block == "Kronecker 10x10 (x) 144x144"
    assert report.parameters["conv.weight"].kronecker_factors  # conv: Kronecker in KFLR
    assert report.parameters["conv.bias"].hbp_block == "dense 4x4"
    assert report.methods["exact"].startswith("yes")
    assert report.methods["hbp"].startswith("yes (largest dense argument matrix 144x144")
    assert report.methods["kflr"] == "yes (2 Kronecker block(s), 2 exact low-rank)"
    text = str(report)
    for expected in ["torch.nn.LocalResponseNorm", "fallback", "hand-written: conv2d", "2x4x6x6"]:
        assert expected in text
    assert "fc.weight 10x144 (1440 entries): HBP Kronecker 10x10 (x) 144x144" in text


def test_hbp_refused_above_max_features_and_for_ops_that_mix_samples():
    report = curvgraph.inspect(Small(), torch.randn(2, 3, 8, 8), fallback=True, max_features=100)
    assert report.methods["hbp"].startswith("no: ")
    assert "144x144" in report.methods["hbp"] and "max_features" in report.methods["hbp"]
    assert report.methods["exact"].startswith("yes")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    report = curvgraph.inspect(model, torch.randn(5, 3))
    assert _node(report, "_1").mixes_samples
    for method in ("hbp", "sqrt", "kflr"):
        assert report.methods[method].startswith("no: node(s) _1 mix samples")
    assert report.methods["exact"].startswith("yes")


def test_missing_rules_are_listed_and_block_every_method():
    report = curvgraph.inspect(Small(), torch.randn(1, 3, 8, 8))
    assert [n.name for n in report.missing] == ["norm"]
    assert all(
        text.startswith("no: 1 node(s) without a usable rule") for text in report.methods.values()
    )
    text = str(report)
    assert "1 node(s) without a rule:" in text and "norm: torch.nn.LocalResponseNorm" in text


def test_to_networkx_carries_the_report_as_node_attributes():
    nx = pytest.importorskip("networkx")
    model = Small()
    with pytest.warns(UserWarning, match="LocalResponseNorm"):
        cg = curvgraph.trace(model, fallback=True)
    graph = cg.to_networkx(torch.randn(2, 3, 8, 8))
    assert isinstance(graph, nx.DiGraph)
    assert graph.has_edge("conv", "norm") and graph.has_edge("fc", "output")
    attributes = graph.nodes["fc"]
    assert attributes["kind"] == "hand-written" and attributes["op"] == "torch.nn.Linear"
    assert attributes["parameter_sizes"] == {"fc.weight": 1440, "fc.bias": 10}
    assert attributes["output_shape"] == (2, 10)
    assert attributes["hbp_sizes"] == {"input": 144, "output": 10}
    assert graph.nodes["norm"]["kind"] == "fallback"
    assert graph.nodes["x"]["kind"] == "input"
    with pytest.raises(curvgraph.CurvGraphError, match="example input"):
        curvgraph.trace(nn.Sequential(nn.Linear(2, 2))).to_networkx()


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "graph.png"
    curvgraph.inspect(Small(), torch.randn(1, 3, 8, 8)).plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_main_prints_the_report_and_plots(tmp_path, capsys, monkeypatch):
    module = types.ModuleType("inspect_test_models")
    module.Small = Small
    monkeypatch.setitem(sys.modules, "inspect_test_models", module)
    path = tmp_path / "small.png"
    argv = ["inspect", "inspect_test_models:Small", "--input", "1,3,8,8", "--fallback"]
    assert main(argv + ["--plot", str(path)]) == 0
    output = capsys.readouterr().out
    assert "curvgraph.inspect(Small)" in output and "fallback" in output
    assert path.is_file()
    assert isinstance(load_model("torchvision:squeezenet1_0"), nn.Module)
    with pytest.raises(SystemExit):
        main(["inspect", "no_colon", "--input", "1,3"])
    with pytest.raises(SystemExit):
        main(["inspect", "torchvision:resnet18", "--input", "1,x"])
