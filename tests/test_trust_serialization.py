"""Issue 14: a traced model deep-copies, pickles and goes through ``torch.save``/``torch.load``.

The state of a traced graph is its model and its ``fallback``/``strict`` settings; a copy
(``copy.deepcopy``, ``pickle``, ``torch.save``) copies those and traces its model again. The
record of the last forward is not kept: the copy is called on a batch before curvature.
Blocks of the copies are compared with the original's and with the torch.func references in
float64.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError, UnsupportedOpError
from curvgraph.graph import TracedGraph

try:
    from reference import ggn_blocks, hessian_blocks
except ImportError:  # run from the repository root as a package
    from tests.reference import ggn_blocks, hessian_blocks

DTYPE = torch.float64
REFERENCES = {"ggn": ggn_blocks, "hessian": hessian_blocks}


def _data(features=4, classes=2, n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, dtype=DTYPE, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)


def _activations(seed=0):
    """Activations whose rules are built from lambdas, and RMSNorm served by the fallback."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 3),
        nn.Tanh(),
        nn.RMSNorm(3),
        nn.GELU(),
        nn.Linear(3, 3),
        nn.Softplus(),
        nn.SiLU(),
        nn.LeakyReLU(),
        nn.Linear(3, 2),
    ).to(DTYPE)


def _blocks(cg, x, y, curvature="ggn"):
    out = cg(x)
    loss = F.cross_entropy(out, y)
    result = cg.curvature(loss, out, curvature=curvature, method="exact")
    return {name: result[name].to_dense() for name in result}


def _assert_equal_blocks(result, expected):
    assert sorted(result) == sorted(expected)
    for name, block in expected.items():
        torch.testing.assert_close(result[name], block, rtol=1e-9, atol=1e-10)


def _trace_quietly(model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning for RMSNorm
        return curvgraph.trace(model, **options)


# -- deepcopy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("after_forward", [False, True], ids=["before-forward", "after-forward"])
def test_deepcopy_gives_a_graph_with_the_same_blocks(curvature, after_forward):
    model = _mlp()
    cg = curvgraph.trace(model)
    x, y = _data()
    if after_forward:  # the record holds non-leaf tensors, and the parameters have gradients
        out = cg(x)
        F.cross_entropy(out, y).backward()
    duplicate = copy.deepcopy(cg)
    assert type(duplicate) is curvgraph.CurvGraph
    assert duplicate.model is not model
    for p, q in zip(model.parameters(), duplicate.model.parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr()
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(CurvGraphError, match="no forward pass recorded"):
        _ = duplicate.record  # the record is not copied: call the copy first
    result = _blocks(duplicate, x, y, curvature)
    _assert_equal_blocks(result, _blocks(cg, x, y, curvature))
    _assert_equal_blocks(result, REFERENCES[curvature](model, x, y, F.cross_entropy))


def test_a_deep_copy_is_independent_of_the_original():
    model = _mlp()
    cg = curvgraph.trace(model)
    x, y = _data()
    duplicate = copy.deepcopy(cg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # an in-place step on the copy's parameters
        for p in duplicate.model.parameters():
            p.add_(0.3 * torch.ones_like(p))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    copied = _blocks(duplicate, x, y)
    original = _blocks(cg, x, y)
    _assert_equal_blocks(copied, ggn_blocks(duplicate.model, x, y, F.cross_entropy))
    _assert_equal_blocks(original, ggn_blocks(model, x, y, F.cross_entropy))
    assert not torch.allclose(copied["0.weight"], original["0.weight"])


def test_a_deep_copy_traces_again_when_its_model_changes():
    model = _mlp()
    cg = curvgraph.trace(model)
    x, y = _data()
    duplicate = copy.deepcopy(cg)
    duplicate.model[2] = nn.Linear(3, 2).to(DTYPE)  # a swapped submodule, on the copy only
    assert duplicate.changes() and not cg.changes()
    _assert_equal_blocks(
        _blocks(duplicate, x, y), ggn_blocks(duplicate.model, x, y, F.cross_entropy)
    )
    _assert_equal_blocks(_blocks(cg, x, y), ggn_blocks(model, x, y, F.cross_entropy))


def test_copies_keep_the_class_and_the_settings():
    model = nn.Sequential(nn.Linear(4, 3), nn.RMSNorm(3)).to(DTYPE)  # RMSNorm: no rule
    with pytest.raises(UnsupportedOpError):
        TracedGraph(model)
    graph = TracedGraph(model, strict=False)
    graph.eval()
    for duplicate in (copy.deepcopy(graph), pickle.loads(pickle.dumps(graph)), copy.copy(graph)):
        assert type(duplicate) is TracedGraph
        assert (duplicate.fallback, duplicate.strict, duplicate.training) == (False, False, False)
        assert [p[0] for p in duplicate.problems] == [p[0] for p in graph.problems]
    assert copy.copy(graph).model is model  # a shallow copy shares the model
    assert copy.deepcopy(graph).model is not model


# -- pickle and torch.save ----------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_pickle_round_trip_with_lambda_rules_and_the_fallback(curvature):
    model = _activations()
    cg = _trace_quietly(model, fallback=True)
    x, y = _data()
    cg(x)  # a record that is not pickled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning is not given again
        loaded = pickle.loads(pickle.dumps(cg))
    assert type(loaded) is curvgraph.CurvGraph
    assert loaded.fallback is True and loaded.strict is True
    rules = {info.op: info.rule for info in loaded.infos.values()}
    assert rules["torch.nn.RMSNorm"].fallback
    result = _blocks(loaded, x, y, curvature)
    _assert_equal_blocks(result, _blocks(cg, x, y, curvature))
    _assert_equal_blocks(result, REFERENCES[curvature](model, x, y, F.cross_entropy))


_LOAD = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    graph_file, data_file, blocks_file = sys.argv[1:]
    cg = torch.load(graph_file, weights_only=False)
    x, y = torch.load(data_file)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    result = cg.curvature(loss, out, curvature="ggn", method="exact")
    blocks = {name: result[name].to_dense() for name in result}
    torch.save({"blocks": blocks, "class": type(cg).__name__, "fallback": cg.fallback}, blocks_file)
    """
)


def test_torch_save_and_load_in_a_fresh_process(tmp_path):
    model = _activations(seed=1)
    cg = _trace_quietly(model, fallback=True)
    x, y = _data(seed=1)
    expected = _blocks(cg, x, y)
    files = [tmp_path / name for name in ("graph.pt", "data.pt", "blocks.pt")]
    torch.save(cg, files[0])
    torch.save((x, y), files[1])
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, *map(str, files)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    loaded = torch.load(files[2])
    assert loaded["class"] == "CurvGraph" and loaded["fallback"] is True
    _assert_equal_blocks(loaded["blocks"], expected)
    _assert_equal_blocks(loaded["blocks"], ggn_blocks(model, x, y, F.cross_entropy))
