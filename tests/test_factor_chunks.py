"""Factor walks in chunks of columns (issue 15 item 4): the same blocks as one walk, in float64.

``kflr`` propagates ``K = C`` exact loss-Hessian columns per sample; where one node's factors
would exceed :data:`curvgraph.methods.factors.FACTOR_CHUNK_BYTES` the graph is walked once
per chunk of columns, rows concatenated and Kronecker output factors summed
(:func:`curvgraph.methods.kflr.merged_columns`). Here the budget is forced down to one column
per walk and every block is compared with the one-walk run: same kinds of blocks and factors,
equal to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
import curvgraph.methods.factors as factor_walk
import curvgraph.rules.layers.conv as conv_rules
from curvgraph.curvature import (
    DenseFactor,
    DiagonalFactor,
    KroneckerBlock,
    RankOneFactor,
    RootFactor,
)
from curvgraph.curvature.sums import SumBlock
from curvgraph.methods.kflr import merged_columns

DTYPE = torch.float64
EQUAL = {"rtol": 1e-12, "atol": 1e-15}
ONE_WALK = 2**62  # a budget no factor reaches
N, C = 3, 5
WALK = factor_walk._walk  # one walk, before a test counts them
DEFAULT_BUDGET = factor_walk.FACTOR_CHUNK_BYTES


class SmallCNN(nn.Module):
    """conv -> relu -> pool -> conv (padded) -> tanh -> linear -> tanh -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(5 * 3 * 3, 6), nn.Linear(6, C)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = torch.tanh(self.conv2(h)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


class TiedLanguageModel(nn.Module):
    """Embedding whose weight is also the output head (GPT-2's tying), tokens ``[N, T]``."""

    def __init__(self, vocabulary=C, width=4):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocabulary, width), nn.Linear(width, width)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(self.emb(x))), self.emb.weight)


class WeightNorm(nn.Module):
    """``F.linear(x, g * v / |v|)``: a derived weight (rows pulled back to ``g`` and ``v``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.v = nn.Parameter(torch.randn(C, 4))
        self.g = nn.Parameter(torch.rand(C, 1) + 0.5)

    def forward(self, x):
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(torch.tanh(self.fc(x)), weight)


def cnn_problem():
    torch.manual_seed(0)
    x = torch.randn(N, 3, 8, 8, dtype=DTYPE)
    return SmallCNN().to(DTYPE), x, torch.randint(C, (N,))


def tied_problem():
    torch.manual_seed(1)
    x = torch.randint(C, (N, 4))
    return TiedLanguageModel().to(DTYPE), x, torch.randint(C, (N, 4))


def derived_problem():
    torch.manual_seed(2)
    return WeightNorm().to(DTYPE), torch.randn(N, 4, dtype=DTYPE), torch.randint(C, (N,))


PROBLEMS = {"cnn": cnn_problem, "tied": tied_problem, "derived": derived_problem}


def blocks(problem, budget, monkeypatch, method="kflr", **options):
    """The blocks of ``method`` with the chunk budget ``budget``, and the walks' column counts."""
    model, x, y = PROBLEMS[problem]()
    monkeypatch.setattr(factor_walk, "FACTOR_CHUNK_BYTES", budget)
    walks = []

    def counted(graph, plan, factors, *args):
        walks.append(factors.shape[0])
        return WALK(graph, plan, factors, *args)

    monkeypatch.setattr(factor_walk, "_walk", counted)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out.flatten(0, -2), y.flatten())
    if method == "kfac":
        options["generator"] = torch.Generator().manual_seed(7)
    return cg.curvature(loss, out, method=method, **options), walks


def assert_same_blocks(chunked, whole):
    """Same parameters, same kinds of blocks and factors, equal dense blocks."""
    assert list(chunked) == list(whole)
    for name in whole:
        a, b = chunked[name], whole[name]
        assert type(a) is type(b), name
        if isinstance(b, SumBlock):
            assert [type(t) for t in a.terms] == [type(t) for t in b.terms], name
        if isinstance(b, KroneckerBlock):
            kinds = [type(f) for f in (b.first_factor, b.second_factor)]
            assert [type(f) for f in (a.first_factor, a.second_factor)] == kinds, name
            assert (a.input_first, a.input_count) == (b.input_first, b.input_count), name
        torch.testing.assert_close(a.to_dense(), b.to_dense(), **EQUAL, msg=name)


CASES = [
    ("cnn", "kflr", {}),
    ("cnn", "kflr", {"kfac_approx": "reduce"}),
    ("cnn", "kflr", {"kfac_approx": "low-rank"}),
    ("cnn", "kfac", {"mc_samples": 4}),
    ("tied", "kflr", {}),
    ("tied", "kflr", {"kfac_approx": "reduce"}),
    ("tied", "kflr", {"kfac_approx": "low-rank"}),
    ("derived", "kflr", {}),
    ("derived", "kfac", {"mc_samples": 3}),
]


@pytest.mark.parametrize("problem,method,options", CASES)
def test_one_column_per_walk_gives_the_blocks_of_one_walk(problem, method, options, monkeypatch):
    whole, one = blocks(problem, ONE_WALK, monkeypatch, method, **options)
    chunked, walks = blocks(problem, 1, monkeypatch, method, **options)
    assert len(one) == 1 and walks == [1] * one[0]  # K = C (times T positions), or mc_samples
    assert one[0] == options.get("mc_samples", one[0]) and one[0] >= 3
    assert_same_blocks(chunked, whole)


def test_chunks_of_several_columns_and_the_default_budget(monkeypatch):
    """A budget of two columns walks ``2, 2, 1``; the default leaves small models in one walk."""
    model, x, _ = cnn_problem()
    largest = max(t.numel() for t in _outputs(model, x)) * x.element_size()
    whole, _ = blocks("cnn", ONE_WALK, monkeypatch)
    chunked, walks = blocks("cnn", 2 * largest, monkeypatch)
    assert walks == [2, 2, 1]
    assert_same_blocks(chunked, whole)
    _, walks = blocks("cnn", DEFAULT_BUDGET, monkeypatch)
    assert walks == [C]


def _outputs(model, x):
    """Every module's and function's output size along the model (a superset of the walk's)."""
    h1 = torch.relu(model.conv1(x))
    h2 = F.max_pool2d(h1, 2)
    h3 = model.conv2(h2)
    return [model.conv1(x), h1, h2, h3, torch.tanh(h3)]


def test_the_input_factor_is_computed_once(monkeypatch):
    """Later chunks reuse ``A`` (``input_factor=``): one unfolding per convolution."""
    unfolded = []
    patch_rows = conv_rules.patch_rows

    def counted(x, *args, **kwargs):
        unfolded.append(tuple(x.shape))
        return patch_rows(x, *args, **kwargs)

    monkeypatch.setattr(conv_rules, "patch_rows", counted)
    _, walks = blocks("cnn", 1, monkeypatch)
    assert len(walks) == C and len(unfolded) == 2


def test_methods_that_need_all_columns_walk_once(monkeypatch):
    """``ekfac`` refits from every column at once, ``sqrt``/``diag`` do not merge: one walk."""
    for method in ("ekfac", "sqrt", "diag"):
        _, walks = blocks("cnn", 1, monkeypatch, method)
        assert walks == [C], method


def test_merged_root_factors_stay_roots_while_thin(monkeypatch):
    """A head over a vocabulary larger than its rows keeps ``G`` root-only across chunks."""

    def wide():
        torch.manual_seed(3)
        model = TiedLanguageModel(vocabulary=40, width=3).to(DTYPE)
        return model, torch.randint(40, (1, 2)), torch.randint(40, (1, 2))

    monkeypatch.setitem(PROBLEMS, "wide", wide)
    whole, _ = blocks("wide", ONE_WALK, monkeypatch, "kfac", mc_samples=3)
    chunked, walks = blocks("wide", 1, monkeypatch, "kfac", mc_samples=3)
    assert walks == [1, 1, 1]
    assert_same_blocks(chunked, whole)


def _factor(kind: str, size: int, seed: int):
    """A factor of ``kind`` (as the rules hand them out) and its dense matrix."""
    root = torch.randn(2, size, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    if kind == "dense":
        return DenseFactor(root.T @ root), root.T @ root
    if kind == "dense+root":  # a thin root kept beside the matrix for products
        return DenseFactor(root.T @ root, root), root.T @ root
    if kind == "rank-one":
        return RankOneFactor(root[0]), torch.outer(root[0], root[0])
    if kind == "diagonal":
        return DiagonalFactor(root[0] ** 2), torch.diag(root[0] ** 2)
    return RootFactor(root), root.T @ root


KINDS = ["dense", "dense+root", "rank-one", "diagonal", "root"]


@pytest.mark.parametrize("second", KINDS)
@pytest.mark.parametrize("first", KINDS)
@pytest.mark.parametrize("input_first", [False, True])
def test_merged_columns_sums_the_output_factors(first, second, input_first):
    """``(G_1 + G_2) (x) A`` for every pair of factor kinds, ``A`` and its count kept."""
    g1, dense1 = _factor(first, 6, seed=1)
    g2, dense2 = _factor(second, 6, seed=2)
    a, dense_a = _factor("dense", 3, seed=3)

    def block(g):
        pair = (a, g) if input_first else (g, a)
        result = KroneckerBlock(*pair, torch.Size((3, 6) if input_first else (6, 3)))
        result.input_first, result.input_count = input_first, 4
        return result

    merged = merged_columns(block(g1), block(g2))
    assert merged.input_factor is a and (merged.input_first, merged.input_count) == (input_first, 4)
    pair = (dense_a, dense1 + dense2) if input_first else (dense1 + dense2, dense_a)
    torch.testing.assert_close(merged.to_dense(), torch.kron(*pair), **EQUAL)
    kinds = {type(g1), type(g2)}
    if kinds == {DiagonalFactor}:
        assert isinstance(merged.output_factor, DiagonalFactor)
    elif kinds <= {RootFactor, RankOneFactor}:  # 4 rows of 6 columns: still root-only
        assert isinstance(merged.output_factor, RootFactor)
    elif first == second == "dense+root":  # 4 rows: too many for a thin root of 6 columns
        assert isinstance(merged.output_factor, DenseFactor) and merged.output_factor.root is None


def test_retain_record_false_releases_after_the_last_chunk(monkeypatch):
    """Each walk but the last reads every call again: the record is freed by the last one."""
    model, x, y = cnn_problem()
    cg = curvgraph.trace(model)
    monkeypatch.setattr(factor_walk, "FACTOR_CHUNK_BYTES", ONE_WALK)
    out = cg(x)
    whole = cg.curvature(F.cross_entropy(out, y), out, method="kflr")
    monkeypatch.setattr(factor_walk, "FACTOR_CHUNK_BYTES", 1)
    contexts = []

    def counted(graph, *args):
        contexts.append(len(graph.record.contexts))
        return WALK(graph, *args)

    monkeypatch.setattr(factor_walk, "_walk", counted)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    chunked = cg.curvature(loss, out, method="kflr", retain_record=False)
    assert len(contexts) == C and len(set(contexts)) == 1 and contexts[0] > 0
    assert cg.record.released and len(cg.record.contexts) == 0
    assert_same_blocks(chunked, whole)
    with pytest.raises(curvgraph.CurvGraphError, match="retain_record=False"):
        cg.curvature(loss, out, method="kflr")
