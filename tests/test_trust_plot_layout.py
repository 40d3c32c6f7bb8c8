"""``InspectionReport.plot`` (``python -m curvgraph inspect ... --plot``) is readable.

Issue 14: a resnet18 was drawn as a 3900 x 360 pixel strip of overlapping labels. Now the
graph is laid out top-down (:mod:`curvgraph.drawing`): chains share a box, consecutive
blocks of the same structure are drawn once with ``x N``. Checked on resnet18 and a tiny
GPT-2 (the figure's size and aspect, no two labels overlapping by their rendered bounding
boxes, every label inside its box) and on small synthetic graphs (repeats, chains, shared
nodes).
"""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.__main__ import main
from curvgraph.drawing import DrawNode, layout

pytest.importorskip("matplotlib")
from matplotlib.patches import FancyBboxPatch  # noqa: E402

TIMES = "\u00d7"


def _labels(figure):
    """``(text, bounding box)`` of every label, and of every node box, as rendered."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    texts = [(t.get_text(), t.get_window_extent(renderer)) for t in axes.texts]
    boxes = [p.get_window_extent(renderer) for p in axes.patches if isinstance(p, FancyBboxPatch)]
    return texts, boxes


def _assert_readable(figure):
    texts, boxes = _labels(figure)
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        assert not box_a.overlaps(box_b), (a, b)
    # the node labels come last, one per box, each inside its box
    for (text, extent), box in zip(texts[-len(boxes) :], boxes):
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1, text
    return [text for text, _ in texts]


def test_resnet18_is_drawn_top_down_with_its_repeated_block_once():
    torchvision = pytest.importorskip("torchvision")
    report = curvgraph.inspect(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    figure = report.figure()
    width, height = figure.get_size_inches()
    assert height > 1.5 * width  # top-down, not a strip (was 39 x 3.6 inches)
    assert width <= 10 and height <= 20
    texts = _assert_readable(figure)
    frames = [t for t in texts if t.startswith(TIMES)]
    assert frames == [f"{TIMES} 2  (layer1_0_conv1 ... layer1_1_conv1)"]
    body = "\n".join(texts)
    assert "layer1_0_bn2" in body and "layer1_1_bn2" not in body  # the copy is not drawn
    assert "layer4_1_bn2" in body  # layer2-4's blocks differ (downsample): all drawn
    boxes = [p for p in figure.axes[0].patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) < len(report.nodes) / 3  # chains share boxes (71 nodes)


def test_tiny_gpt2_draws_one_transformer_block_with_its_count():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(config).eval()
    report = curvgraph.inspect(model, torch.randint(0, 50, (2, 6)), output="logits")
    figure = report.figure()
    width, height = figure.get_size_inches()
    assert height > width and width <= 16 and height <= 24
    texts = _assert_readable(figure)
    assert [t for t in texts if t.startswith(TIMES)] == [
        f"{TIMES} 2  (layer_norm ... layer_norm_2)"
    ]
    body = "\n".join(texts)
    assert "transformer_h_0_attn_c_attn_weight" in body
    assert "transformer_h_1_" not in body
    assert "(used by" in body  # the shape and the mask every block reads: no edges drawn


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Deep(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(3, 6), *[Residual() for _ in range(8)], nn.Linear(6, 2))


def test_cli_plot_writes_a_tall_png(tmp_path, monkeypatch):
    image = pytest.importorskip("matplotlib.image")
    module = types.ModuleType("plot_layout_models")
    module.Deep = Deep
    monkeypatch.setitem(sys.modules, "plot_layout_models", module)
    path = tmp_path / "deep.png"
    assert main(["inspect", "plot_layout_models:Deep", "--input", "2,3", "--plot", str(path)]) == 0
    pixels = image.imread(path)
    assert pixels.shape[0] > pixels.shape[1]  # rows (height) > columns: top-down
    figure = curvgraph.inspect(Deep(), torch.randn(2, 3)).figure()
    texts = _assert_readable(figure)
    assert f"{TIMES} 8  (_1_fc1 ... _8_fc1)" in texts


def _mlp(depth):
    nodes = [DrawNode("x", "placeholder", "input")]
    previous = "x"
    for k in range(depth):
        for name, op in ((f"fc{k}", "Linear"), (f"act{k}", "ReLU")):
            nodes.append(DrawNode(name, op, "hand-written", (previous,), ((8, 8),), True))
            previous = name
    return nodes + [DrawNode("output", "output", "output", (previous,))]


def test_repeats_are_framed_and_chains_share_a_box():
    graph = layout(_mlp(4))
    assert [frame.label for frame in graph.frames] == [f"{TIMES} 4  (fc0 ... fc3)"]
    lines = [box.lines for box in graph.boxes]
    assert lines == [["x: input"], ["fc0: Linear", "act0: ReLU"], ["output"]]
    assert [box.rank for box in graph.boxes] == [0, 1, 2]
    assert len(graph.edges) == 2  # x -> fc0 and act0 -> output (the copies' edges dropped)


def test_shared_nodes_lose_their_edges_only_without_parameters_upstream():
    """A mask used by many far-apart nodes is shared; a dense block's features are not."""
    nodes = [DrawNode("x", "placeholder", "input"), DrawNode("mask", "arange", "hand-written")]
    previous = "x"
    for k in range(16):
        name = f"layer{k}"
        inputs = (previous, "mask") if k % 5 == 0 else (previous,)
        nodes.append(DrawNode(name, f"op{k}", "hand-written", inputs, (), True))
        previous = name
    nodes.append(DrawNode("output", "output", "output", (previous,)))
    graph = layout(nodes)
    mask = next(box for box in graph.boxes if box.nodes == ["mask"])
    assert mask.lines == ["mask: arange  (used by 4 nodes)"]
    starts = {edge[0] for edge in graph.edges}
    assert (mask.center, mask.y + mask.height) not in starts
    assert [len(box.nodes) for box in graph.boxes] == [1, 1, 16, 1]  # one chain of layers
    nodes[1] = DrawNode("mask", "arange", "hand-written", (), (), True)  # now a weight's
    graph = layout(nodes)
    mask = next(box for box in graph.boxes if box.nodes == ["mask"])
    assert mask.lines == ["mask: arange"]
    ends = {edge[-1] for edge in graph.edges}
    users = [
        box for box in graph.boxes if box.nodes[0] in ("layer0", "layer5", "layer10", "layer15")
    ]
    assert len(users) == 4 and all((box.center, box.y) in ends for box in users)


def test_a_small_model_is_still_drawn(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    figure = curvgraph.inspect(model, torch.randn(1, 3, 8, 8)).figure()
    texts = _assert_readable(figure)
    assert any("0: Conv2d" in t for t in texts)
