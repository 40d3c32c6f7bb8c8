"""The record keeps only what autograd keeps, and recomputes the rest exactly when read.

References: the same forward recorded in full (saved-tensor hooks of the user's own turn
slimming off), torch.func in float64, and the rules' sample calls (``check_rule`` hands
every rule its value-free slots as zero stand-ins, so a wrong declaration fails there).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.graph.slim import Rematerialized
from tests.reference import ggn_blocks, hessian_blocks


class Block(nn.Module):
    """GPT-2's pieces that autograd does not save: a tanh GELU, x @ W + b, attention."""

    def __init__(self, d=6, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Parameter(torch.randn(d, 3 * d) / math.sqrt(d))
        self.bias = nn.Parameter(torch.randn(3 * d) / 10)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, 3)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (x @ self.qkv + self.bias).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        a = torch.softmax(scores, dim=-1) @ v
        h = x + a.transpose(1, 2).reshape(n, t, d)
        u = self.fc(h)
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        return self.out(gelu).mean(1)


def _setup(seed=0, n=4):
    torch.manual_seed(seed)
    model = Block().double()
    x = torch.randn(n, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def _full(cg, x):
    """The forward recorded with every tensor kept (another saved-tensor hook is open)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return cg(x)


def _handles(cg):
    return [
        name
        for name, ctx in cg.record.contexts.stored.items()
        if isinstance(ctx.output, Rematerialized)
        or any(isinstance(v, Rematerialized) for v in ctx.args.values())
    ]


def test_record_drops_what_autograd_does_not_save_and_recomputes_it_exactly():
    model, x, _ = _setup()
    cg = curvgraph.trace(model)
    _full(cg, x)
    full = {name: cg.record.contexts[name] for name in cg.record.contexts}
    assert not _handles(cg)
    cg(x)
    slim = cg.record.contexts
    dropped = _handles(cg)
    assert dropped, "nothing dropped: x ** 3, x @ W, the scores are not saved by autograd"
    ops = {n.name: n for n in cg.graph_module.graph.nodes}
    creators = {
        v.creator
        for ctx in slim.stored.values()
        for v in [*ctx.args.values(), ctx.output]
        if isinstance(v, Rematerialized)
    }
    labels = {getattr(ops[name].target, "__name__", str(ops[name].target)) for name in creators}
    assert {"matmul", "pow"} <= labels, labels
    for name in full:
        ctx, expected = slim[name], full[name]
        free = cg.infos[ops[name]].rule.value_free
        for slot, value in [*expected.args.items(), ("output", expected.output)]:
            actual = ctx.output if slot == "output" else ctx.args[slot]
            if not isinstance(value, torch.Tensor):
                continue
            assert actual.shape == value.shape and actual.dtype == value.dtype, (name, slot)
            if slot not in free:
                assert torch.equal(actual, value), (name, slot)


@pytest.mark.parametrize(
    "curvature, method",
    [("ggn", "exact"), ("hessian", "exact"), ("pch-abs", "exact"), ("ggn", "hbp")]
    + [("ggn", "kflr"), ("ggn", "kfac"), ("ggn", "diag"), ("ggn", "sqrt")],
)
def test_slim_record_gives_the_full_records_curvature(curvature, method):
    model, x, y = _setup(1)
    cg = curvgraph.trace(model)
    blocks = []
    for forward in (_full, lambda cg, x: cg(x)):
        out = forward(cg, x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        torch.manual_seed(3)  # the same Monte-Carlo draws for kfac
        curv = cg.curvature(loss, out, curvature, method=method)
        blocks.append({name: block.to_dense() for name, block in curv.items()})
    assert blocks[0].keys() == blocks[1].keys()
    for name in blocks[0]:
        torch.testing.assert_close(blocks[1][name], blocks[0][name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("after_backward", [False, True])
def test_exact_blocks_from_a_slim_record_equal_torch_func(after_backward):
    model, x, y = _setup(2, n=3)
    cg = curvgraph.trace(model)
    out = cg(x)
    assert _handles(cg)
    loss = F.cross_entropy(out, y)
    if after_backward:
        loss.backward()
    hessian = cg.curvature(loss, out, "hessian", method="exact")
    ggn = cg.curvature(loss, out, "ggn", method="exact")
    for curv, reference in (
        (hessian, hessian_blocks(model, x, y, F.cross_entropy)),
        (ggn, ggn_blocks(model, x, y, F.cross_entropy)),
    ):
        assert set(curv) == set(reference)
        for name, block in curv.items():
            torch.testing.assert_close(block.to_dense(), reference[name], rtol=1e-10, atol=1e-12)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.dropout(self.fc1(x) * 2.0, p=0.5, training=True) + 1.0
        return self.fc2(torch.tanh(h) ** 2)


def test_random_ops_are_never_recomputed():
    torch.manual_seed(0)
    model = Noisy().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    cg = curvgraph.trace(model)
    out = cg(x)
    ops = {n.name: n for n in cg.graph_module.graph.nodes}
    for ctx in cg.record.contexts.stored.values():
        for value in [*ctx.args.values(), ctx.output]:
            if isinstance(value, Rematerialized):
                label = getattr(ops[value.creator].target, "__name__", "")
                assert "dropout" not in label, label
    loss = F.cross_entropy(out, y)
    torch.manual_seed(5)
    first = cg.curvature(loss, out, "ggn", method="exact")
    torch.manual_seed(6)  # other draws: a recomputed dropout would change the blocks
    second = cg.curvature(loss, out, "ggn", method="exact")
    for name, block in first.items():
        torch.testing.assert_close(second[name].to_dense(), block.to_dense(), rtol=0, atol=0)


def test_user_saved_tensor_hooks_keep_the_full_record():
    model, x, _ = _setup()
    cg = curvgraph.trace(model)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        cg(x)
    assert packed, "the user's hook was replaced"
    assert not _handles(cg)


class Convolutional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3)
        self.bn, self.relu = nn.BatchNorm2d(3), nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv1(x)))
        h = torch.sigmoid(self.conv2(h))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def test_modules_run_again_only_without_state_and_curvature_is_unchanged():
    torch.manual_seed(0)
    model = Convolutional().double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    cg = curvgraph.trace(model)
    ops = {n.name: n for n in cg.graph_module.graph.nodes}
    results = []
    for forward in (_full, lambda cg, x: cg(x)):
        running = model.bn.running_mean.clone()
        out = forward(cg, x)
        loss = F.cross_entropy(out, y)
        curv = cg.curvature(loss, out, "hessian", method="exact")
        results.append({name: block.to_dense() for name, block in curv.items()})
        assert not torch.equal(model.bn.running_mean, running)  # one update per forward
        running = model.bn.running_mean.clone()
        cg.curvature(loss, out, "pch-abs", method="exact")
        assert torch.equal(model.bn.running_mean, running)  # no second update
    creators = {
        ops[v.creator].target
        for ctx in cg.record.contexts.stored.values()
        for v in [*ctx.args.values(), ctx.output]
        if isinstance(v, Rematerialized) and v.creator is not None
    }
    assert "bn" not in creators and "conv2" in creators, creators
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-12, atol=1e-14)


def test_another_backward_through_the_outputs_does_not_change_the_hessian():
    """The hooks on the returned tensor see every backward through it (here another
    function's gradient); with the loss's graph alive its own dL/dout is used."""
    model, x, y = _setup(4, n=3)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    torch.autograd.grad((out**3).sum(), model.out.weight, retain_graph=True)
    hessian = cg.curvature(loss, out, "hessian", method="exact")
    reference = hessian_blocks(model, x, y, F.cross_entropy)
    for name, block in hessian.items():
        torch.testing.assert_close(block.to_dense(), reference[name], rtol=1e-10, atol=1e-12)


def test_saved_tensors_one_op_from_kept_ones_are_dropped_and_recomputed_exactly():
    """Autograd frees what it saved during ``backward()``; the record then alone would hold it.

    A LayerNorm's and a GELU's outputs (saved for the next Linear's weight gradient) are
    recomputed by one op from tensors the record keeps; a saved tensor whose op would run on
    another such recomputed tensor is kept (every read would run the chain again).
    """
    torch.manual_seed(0)
    d = 6
    model = nn.Sequential(
        nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), Block()
    ).double()
    x = torch.randn(4, 5, d, dtype=torch.float64)
    cg = curvgraph.trace(model)
    _full(cg, x)
    full = {name: cg.record.contexts[name] for name in cg.record.contexts}
    F.cross_entropy(cg(x), torch.randint(0, 3, (4,))).backward()
    stored, ops = cg.record.contexts.stored, {n.name: n for n in cg.graph_module.graph.nodes}
    for kind in ("LayerNorm", "GELU"):
        (name,) = [n for n, ctx in stored.items() if type(ctx.module).__name__ == kind]
        assert isinstance(stored[name].output, Rematerialized), kind
        (user,) = [u.name for u in ops[name].users]  # the Linear reads it: recomputed
        assert isinstance(stored[user].args["input"], Rematerialized), kind
        rebuilt = cg.record.contexts[user].args["input"]
        assert torch.equal(rebuilt, full[user].args["input"]), kind
    tanh = [n for n in stored if getattr(ops[n].target, "__name__", "") == "tanh"]
    # tanh's input (u + 0.044715 u^3, scaled) is itself recomputed: tanh's output is kept
    assert tanh and all(isinstance(stored[n].output, torch.Tensor) for n in tanh)
