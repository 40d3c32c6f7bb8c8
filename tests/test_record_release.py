"""The record's memory: dropped during the forward, freed by ``retain_record=False``, no leak.

References: the same curvature with the record retained (the default), autograd's own
graph (freed when nothing holds it), and the record's bytes while the forward runs.
"""

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.graph import record as record_module
from curvgraph.methods import registered_methods


class Layer(nn.Module):
    """A tanh GELU after ``x @ W``: intermediates that autograd never saves."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x):
        u = x @ self.w
        return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


def _model(layers=4, d=16):
    torch.manual_seed(0)
    return nn.Sequential(*[Layer(d) for _ in range(layers)], nn.Linear(d, 3)).double()


def _batch(n=6, d=16):
    return torch.randn(n, d, dtype=torch.float64), torch.randint(0, 3, (n,))


def _blocks(curv):
    return {name: block.to_dense() for name, block in curv.items()}


METHODS = [m for m in registered_methods() if "ggn" in registered_methods()[m].curvatures]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_released_record_gives_the_same_blocks(method):
    model = _model()
    cg = curvgraph.trace(model)
    x, y = _batch()
    monte_carlo = registered_methods()[method].monte_carlo

    def extra():  # the same Monte-Carlo draws for both calls
        return (
            {"mc_samples": 2, "generator": torch.Generator().manual_seed(3)} if monte_carlo else {}
        )

    out = cg(x)
    loss = F.cross_entropy(out, y)
    kept = _blocks(cg.curvature(loss, out, "ggn", method, **extra()))
    released = cg.curvature(loss, out, "ggn", method, retain_record=False, **extra())
    assert cg.record.released and len(cg.record.contexts) == 0
    for name, block in _blocks(released).items():
        torch.testing.assert_close(block, kept[name], rtol=1e-12, atol=1e-12)
    with pytest.raises(curvgraph.CurvGraphError, match="retain_record=False"):
        cg.curvature(loss, out, "ggn", method)
    out = cg(x)  # a new forward records again
    cg.curvature(F.cross_entropy(out, y), out, "ggn", method, **extra())


def test_factor_methods_free_each_call_as_the_walk_passes_it(monkeypatch):
    cg = curvgraph.trace(_model())
    x, y = _batch()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    sizes = []
    release = record_module.Record.release

    def counting(self, name=None):
        release(self, name)
        sizes.append(len(self.contexts))

    monkeypatch.setattr(record_module.Record, "release", counting)
    recorded = len(cg.record.contexts)
    cg.curvature(loss, out, "ggn", "kflr", retain_record=False)
    assert sizes[0] == recorded - 1  # the output's node is freed first
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 0


def test_retain_record_takes_a_bool():
    cg = curvgraph.trace(_model())
    x, y = _batch()
    out = cg(x)
    with pytest.raises(TypeError, match="retain_record"):
        cg.curvature(F.cross_entropy(out, y), out, "ggn", "kflr", retain_record="no")
    assert not cg.record.released


def test_forward_without_backward_leaks_no_autograd_graph():
    """Saved outputs (tanh keeps its result) must not hold their own grad_fn."""
    cg = curvgraph.trace(_model())
    x, _ = _batch()
    out = cg(x)
    saved = [t for name, t in cg.record.outputs.items() if name.startswith("matmul")]
    assert saved  # an output autograd saves (the backward of u**3 reads u) and the record keeps
    probes = [weakref.ref(t) for t in saved]
    del out, saved
    cg(x)  # replaces the record: nothing holds the first graph any more
    gc.collect()
    assert all(probe() is None for probe in probes)


def test_the_last_record_is_dropped_before_the_next_forward_runs():
    """Only the last forward's record serves curvature: two must never be alive at once."""
    model, seen, old = _model(), [], [lambda: None]
    # runs inside the second forward, before its record is complete
    model[-1].register_forward_pre_hook(lambda module, args: seen.append(old[0]() is None))
    cg = curvgraph.trace(model)
    x, y = _batch()
    out = cg(x)  # the user keeps the first output (a training loop's `out` until reassigned)
    F.cross_entropy(out, y).backward()
    old[0] = weakref.ref(cg.record)
    gc.collect()
    seen.clear()
    out2 = cg(x)
    assert seen == [True]
    assert cg.record.result is out2 and out is not out2


def test_storages_are_dropped_while_the_forward_runs(monkeypatch):
    """The record never holds more than at the end of the forward (each u**3 dies early)."""
    cg = curvgraph.trace(_model(layers=6, d=64))
    x, _ = _batch(n=32, d=64)
    held = []
    run_node = record_module.Recorder.run_node

    def measuring(self, n):
        output = run_node(self, n)
        storages = {}
        for ctx in self.record.contexts.stored.values():
            for value in [*ctx.args.values(), ctx.output]:
                if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        held.append(sum(storages.values()))
        return output

    monkeypatch.setattr(record_module.Recorder, "run_node", measuring)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        cg(x)  # the user's own hooks: the whole record is kept
    full = held[-1]
    held.clear()
    cg(x)
    layer = 32 * 64 * 8  # one [32, 64] float64 activation
    assert max(held) <= held[-1] + 2 * layer  # a dying storage lives until its last use
    # u**3, 0.044715 u**3, u + ..., sqrt(2 / pi) (...) of each of 6 layers: autograd saves none
    assert held[-1] <= full - 4 * 6 * layer


def test_a_rule_that_changes_a_parameter_in_place_is_refused(monkeypatch):
    rule = curvgraph.rules.lookup_rule(nn.Linear)
    function = rule.function

    def changing(input, weight, bias=None):
        weight.mul_(1.0)  # the same values, a new version: the model was touched
        return function(input, weight, bias)

    monkeypatch.setattr(rule, "function", changing)
    monkeypatch.setattr(rule, "signature", rule.signature)
    cg = curvgraph.trace(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(curvgraph.CurvGraphError, match=r"changed the module's argument\(s\)"):
        cg(torch.randn(4, 3))


class Doubling(nn.Module):
    """Doubles its input in place, without an ``inplace`` flag that says so."""

    def forward(self, x):
        return x.mul_(2)


def test_a_module_that_changes_its_input_in_place_unflagged_is_refused():
    curvgraph.rules.elementwise_rule(
        Doubling,
        function=lambda input: 2 * input,
        first=lambda input: 2 + 0 * input,
        second=lambda input: 0 * input,
    )
    try:
        model = nn.Sequential(nn.Linear(3, 3), Doubling(), nn.Linear(3, 2))
        cg = curvgraph.trace(model)
        with pytest.raises(curvgraph.CurvGraphError, match="changed its argument"):
            cg(torch.randn(4, 3))
    finally:
        curvgraph.rules.unregister(Doubling)


def test_versions_skip_tensors_without_strided_storage():
    """A sparse argument has no ``data_ptr``: the in-place check skips it instead of raising."""
    from curvgraph.graph.forward_check import versions

    dense = torch.randn(3)
    assert versions({"sparse": torch.randn(3).to_sparse(), "dense": dense}) == {
        "dense": dense._version
    }
