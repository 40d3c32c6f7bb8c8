"""Small random models with the traps of issue 14, for ``test_trust_traps_hypothesis.py``.

A :class:`TrapNet` is an optional conv stem, a stem linear layer, random steps (linear layers,
residual adds, concatenations, a weight used directly, ops without a derivative on the main
path or a branch, a threshold read only by a comparison, a custom autograd Function) and a
linear head. A :class:`Case` holds one drawn model, its traps and loss, and computes the
references of its blocks with ``torch.func`` only (``tests/reference.py``,
``tests/reference_graph.py``), in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

try:
    import reference as ref
    import reference_graph as ref_graph
except ImportError:  # tests/ imported as a package
    from tests import reference as ref
    from tests import reference_graph as ref_graph

DTYPE = torch.float64
WIDTH, CLASSES = 4, 3
ACTIVATIONS = [torch.tanh, torch.sigmoid, F.softplus, torch.relu]
CUTS = [
    torch.sign,
    lambda h: (h > 0).to(h.dtype),
    lambda h: F.one_hot(h.argmax(-1), WIDTH).to(h.dtype),
]
STEPS = ["linear", "residual", "concat", "direct", "derived", "tied"]
STEPS += ["cut_chain", "cut_branch", "threshold"]
#: traps around the model (``Case.traps``)
TRAPS = ["replace_param", "swap_module", "step_after", "step_between", "replace_late"]
TRAPS += ["penalty", "coupled", "custom_function", "freeze", "input_modified", "data_replaced"]
#: per-sample losses ``(out, labels, targets) -> loss``
LOSSES = {
    "cross_entropy": lambda out, y, t: F.cross_entropy(out, y),
    "cross_entropy_smoothed_sum": lambda out, y, t: F.cross_entropy(
        out, y, reduction="sum", label_smoothing=0.1
    ),
    "nll_of_log_softmax": lambda out, y, t: F.nll_loss(F.log_softmax(out, -1), y),
    "mse_sum": lambda out, y, t: F.mse_loss(out, t, reduction="sum"),
    "mse_mean": lambda out, y, t: F.mse_loss(out, t),
    "bce_with_logits": lambda out, y, t: F.binary_cross_entropy_with_logits(out, t.sigmoid()),
}
#: losses that couple the samples, added to the per-sample loss
COUPLINGS = [
    lambda out: 0.1 * out.sum() ** 2,
    lambda out: F.cross_entropy(out.T, torch.arange(CLASSES) % out.shape[0]),
    lambda out: (out[0] * out[-1]).sum(),
]


class STE(Function):
    """Straight-through estimator: ``sign`` forward, the identity's gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Direct(nn.Module):
    """Holds a weight the model uses directly (``F.linear(h, self.w)``), not by a call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(WIDTH, WIDTH))


class Threshold(nn.Module):
    """Holds a threshold the model reads only through a comparison ``h > t``."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(0.1 * torch.randn(WIDTH))


def _block(kind):
    if kind == "concat":
        return nn.Linear(2 * WIDTH, WIDTH)
    blocks = {"direct": Direct, "derived": Direct, "threshold": Threshold}
    return blocks.get(kind, lambda: nn.Linear(WIDTH, WIDTH))()


class TrapNet(nn.Module):
    """An optional conv stem, a stem linear layer, random steps and a linear head."""

    def __init__(self, steps, conv, custom):
        super().__init__()
        self.steps, self.custom = steps, custom
        self.conv = nn.Conv2d(1, 2, 2) if conv else None
        self.stem = nn.Linear(8 if conv else WIDTH, WIDTH)
        self.blocks = nn.ModuleList(_block(kind) for kind, _ in steps)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1) if self.conv is not None else x
        h = self.stem(h)
        for block, (kind, choice) in zip(self.blocks, self.steps):
            act, cut = ACTIVATIONS[choice % 4], CUTS[choice % 3]
            if kind == "linear":
                h = act(block(h))
            elif kind == "residual":
                h = h + act(block(h))
            elif kind == "concat":
                h = block(torch.cat([h, act(h)], dim=1))
            elif kind == "direct":
                h = act(F.linear(h, block.w))
            elif kind == "derived":  # a weight computed from a parameter alone
                h = act(F.linear(h, torch.tanh(block.w)))
            elif kind == "tied":
                h = block(act(block(h)))
            elif kind == "cut_chain":
                h = block(cut(h))
            elif kind == "cut_branch":
                h = h + block(cut(h))
            else:
                h = h * (h > block.t).to(h.dtype)
        if self.custom:
            h = h + STE.apply(h)
        return self.head(h)


def _owner(model, name):
    *path, leaf = name.split(".")
    return model.get_submodule(".".join(path)), leaf


def replace_parameter(model, index):
    names = [name for name, _ in model.named_parameters()]
    owner, leaf = _owner(model, names[index % len(names)])
    setattr(owner, leaf, nn.Parameter(torch.randn_like(getattr(owner, leaf))))


def swap_module(model, index):
    linears = [i for i, block in enumerate(model.blocks) if isinstance(block, nn.Linear)]
    if not linears:
        model.head = nn.Linear(WIDTH, CLASSES).to(DTYPE)
        return
    old = model.blocks[linears[index % len(linears)]]
    new = nn.Linear(old.in_features, WIDTH)
    if index % 2:  # another kind of module: the graph changes shape
        new = nn.Sequential(new, nn.Tanh())
    model.blocks[linears[index % len(linears)]] = new.to(DTYPE)


def freeze_parameter(model, index):
    parameters = list(model.parameters())
    parameters[index % len(parameters)].requires_grad_(False)


def step_parameters(model, in_place=True):
    with torch.no_grad():
        for p in model.parameters():
            if in_place:
                p.add_(0.3 * torch.randn_like(p))
            else:  # a new tensor behind the same parameter
                p.data = p.data + 0.3 * torch.randn_like(p)


class Case:
    """One drawn example: the model, its traps, data for one batch size and its references."""

    def __init__(self, steps, conv, traps, index, loss_kind, seed, pch):
        torch.manual_seed(seed)
        self.curvatures = {"hessian", "ggn", pch}  # one PCH per example: its reference is slow
        self.traps, self.index, self.loss_kind, self.conv = traps, index, loss_kind, conv
        self.model = TrapNet(steps, conv, "custom_function" in traps).to(DTYPE)
        self.penalty = 0.05 if "penalty" in traps else 0.0

    def approximate(self, check):
        """Blocks that Kronecker factors (``check``) approximate already for one sample."""
        if check not in ("kronecker", "eigenbasis"):
            return set()
        # a tied weight: the sum of its uses' Kronecker blocks (EK-FAC keeps it)
        tied = [f"blocks.{i}." for i, (kind, _) in enumerate(self.model.steps) if kind == "tied"]
        return {"conv.weight", "conv.bias"} | {
            name
            for name, _ in self.model.named_parameters()
            if name.endswith("weight") and name.startswith(tuple(tied))
        }

    def penalised(self):
        """The names of the parameters the penalty reaches: every other one."""
        names = [name for name, _ in self.model.named_parameters()]
        return names[self.index % 2 :: 2]

    def data(self, n):
        shape = (1, 3, 3) if self.conv else (WIDTH,)
        generator = torch.Generator().manual_seed(n)
        x = torch.randn(n, *shape, dtype=DTYPE, generator=generator)
        y = torch.randint(0, CLASSES, (n,), generator=generator)
        target = torch.randn(n, CLASSES, dtype=DTYPE, generator=generator)
        return x, y, target

    def output_loss(self, out, y, target):
        """The loss as a function of the outputs alone (the penalty is added separately)."""
        loss = LOSSES[self.loss_kind](out, y, target)
        if "coupled" in self.traps:
            loss = loss + COUPLINGS[self.index % len(COUPLINGS)](out)
        return loss

    def loss(self, out, y, target):
        loss = self.output_loss(out, y, target)
        if self.penalty:
            parameters = dict(self.model.named_parameters())
            loss = loss + self.penalty * sum(parameters[n].pow(2).sum() for n in self.penalised())
        return loss

    def references(self, cg, x, y, target, curvature):
        """``name -> dense block`` by torch.func in float64 at the model's current point."""

        def of(out, labels):
            return self.output_loss(out, labels, target)

        if curvature == "hessian":
            blocks = ref.hessian_blocks(self.model, x, y, of)
        elif curvature == "ggn":
            blocks = ref.ggn_blocks(self.model, x, y, of)
        else:
            mode = curvature.split("-")[1]
            blocks = ref_graph.pch_blocks_graph(cg.graph_module, x, lambda o: of(o, y), mode)
        # a penalty's Hessian 2 c I (convex: also its GGN and PCH term) if a method adds it
        for name in self.penalised() if self.penalty else ():
            blocks[name] = blocks[name] + 2 * self.penalty * torch.eye(len(blocks[name]))
        frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad]
        return {name: block for name, block in blocks.items() if name not in frozen}
