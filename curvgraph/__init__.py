"""curvgraph: block curvature (Hessian, GGN, PCH) for unmodified PyTorch models.

>>> import torch, curvgraph
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 2))
>>> cg = curvgraph.trace(model)
>>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
>>> out = cg(x)
>>> loss = torch.nn.functional.cross_entropy(out, y)
>>> curv = cg.curvature(loss, out, curvature="ggn")
>>> curv["0.weight"].to_dense().shape
torch.Size([12, 12])
"""

from curvgraph import optim, progress, rules, solvers
from curvgraph.api import CurvGraph, trace
from curvgraph.curvature import (
    Block,
    BlockCurvature,
    DenseBlock,
    DiagonalBlock,
    ImplicitBlock,
    KroneckerBlock,
    LowRankBlock,
)
from curvgraph.errors import CurvatureSizeError, CurvGraphError, TraceError, UnsupportedOpError
from curvgraph.inspection import inspect
from curvgraph.losses import LossStructureError, loss_hessian
from curvgraph.progress import set_progress
from curvgraph.rules import Rule, register_rule

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockCurvature",
    "CurvGraph",
    "CurvGraphError",
    "CurvatureSizeError",
    "DenseBlock",
    "DiagonalBlock",
    "ImplicitBlock",
    "KroneckerBlock",
    "LossStructureError",
    "LowRankBlock",
    "Rule",
    "TraceError",
    "UnsupportedOpError",
    "inspect",
    "loss_hessian",
    "optim",
    "progress",
    "register_rule",
    "rules",
    "set_progress",
    "solvers",
    "trace",
]
