"""Problems and the timed callables of the operators section."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn

import curvgraph
from benchmarks.problems import get

__all__ = ["CANDIDATES", "PROBLEMS", "build", "candidates"]

#: problem -> batch size
PROBLEMS = {"mnist_mlp": 128, "cifar10_3c3d": 64, "resnet18_cifar": 32}
CANDIDATES = (
    "gradient",
    "cg_ggn",
    "cg_ggn_with_forward",
    "curvlinops_ggn",
    "cg_hessian",
    "cg_hessian_with_forward",
    "curvlinops_hessian",
    "cg_ggn_last_weight",
)


def build(problem: str) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (eval mode, float32, seed 0) and one batch."""
    n = PROBLEMS[problem]
    torch.manual_seed(0)
    if problem == "resnet18_cifar":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10).eval()
        return model, torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    spec = get(problem)
    x, y = spec.batch(n)
    return spec.model().eval(), x, y


def candidates(problem: str, only=None) -> Dict[str, Callable[[], object]]:
    """Name -> a callable doing one of the measured computations (set up: ``only`` or all)."""
    model, x, y = build(problem)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params))
    cg = curvgraph.trace(model)

    def operator(curvature):
        out = cg(x)
        return cg.curvature(loss_fn(out, y), out, curvature, "exact", structure="full")

    def gradient():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def built(curvature):
        op = operator(curvature)
        return lambda: op.matvec(v)

    def last_weight():  # parameters=: the product walks from this parameter only
        name = [n for n, p in model.named_parameters() if n.endswith("weight")][-1]
        out = cg(x)
        op = cg.curvature(loss_fn(out, y), out, "ggn", "exact", structure="full", parameters=[name])
        w = torch.randn(op.numel)
        return lambda: op.matvec(w)

    def peer(kind):
        import curvlinops

        cls = {"ggn": curvlinops.GGNLinearOperator, "hessian": curvlinops.HessianLinearOperator}
        options = {"progressbar": False, "check_deterministic": False}
        linear_operator = cls[kind](model, loss_fn, params, [(x, y)], **options)
        return lambda: linear_operator @ v

    factories = {
        "gradient": lambda: gradient,
        "cg_ggn": lambda: built("ggn"),
        "cg_ggn_with_forward": lambda: lambda: operator("ggn").matvec(v),
        "curvlinops_ggn": lambda: peer("ggn"),
        "cg_hessian": lambda: built("hessian"),
        "cg_hessian_with_forward": lambda: lambda: operator("hessian").matvec(v),
        "curvlinops_hessian": lambda: peer("hessian"),
        "cg_ggn_last_weight": last_weight,
    }
    return {name: factories[name]() for name in (only or CANDIDATES)}
