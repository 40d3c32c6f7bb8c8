"""One row of the cost table (:class:`Cell`), the problem bench, and curvgraph's rows."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

import curvgraph
from benchmarks.cost.config import HBP_MAX_FEATURES, METHODS, SEED, CostConfig
from benchmarks.problems import Problem

# -- cells -----------------------------------------------------------------------------------


#: beginnings of ``missing`` entries that explain an empty column rather than a failure
INFO_PREFIXES = ("BackPACK computes", "the factor computation", "nothing to", "BackPACK stores")


class CellTimeout(BaseException):
    """Raised by the alarm when one call exceeds the cell's time limit.

    A ``BaseException`` so that library code catching ``Exception`` does not swallow it.
    """


class NotApplicable(Exception):
    """A cell or measurement that cannot run here; the message says why."""


Plan = Tuple[Callable, Optional[Callable[[], Any]]]


@dataclass
class Cell:
    """One row of the cost table: a library's computation of one curvature quantity."""

    group: str  # e.g. "kfac" or "exact/ggn": the curvgraph method (and curvature) it sits by
    library: str  # curvgraph | backpack | curvlinops | torch.func
    label: str  # what is computed, e.g. "KFAC (mc_samples=1)"
    curvature: str
    measurements: Dict[str, Plan] = field(default_factory=dict)
    missing: Dict[str, str] = field(default_factory=dict)  # measurement -> why n/a
    reason: Optional[str] = None  # the whole cell is n/a
    note: str = ""

    @property
    def key(self) -> str:
        """Unique name of the cell within a problem."""
        return f"{self.library}:{self.label}:{self.curvature}"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def version_of(distribution: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # noqa: BLE001 - not installed or no metadata
        return None


class Bench:
    """One problem's model, traced graph, batch and product vectors."""

    def __init__(self, problem: Problem, n: int, config: CostConfig):
        self.problem = problem
        self.n = n
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.x, self.y = problem.batch(n, self.device, self.dtype, config.data_dir)
        self.model = problem.model(SEED, self.device, self.dtype)
        self.graph = curvgraph.trace(self.model)
        g = torch.Generator().manual_seed(SEED + 1)
        self.vectors = {
            name: torch.randn(p.shape, generator=g, dtype=self.dtype).to(self.device)
            for name, p in self.model.named_parameters()
        }
        self.flat = torch.cat([v.flatten() for v in self.vectors.values()])
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        with torch.no_grad():
            self.num_classes = self.model(self.x[:1]).shape[-1]

    def grad_plain(self) -> None:
        """zero_grad + model(x) + cross-entropy + backward."""
        self.model.zero_grad(set_to_none=True)
        self.problem.loss(self.model(self.x), self.y).backward()

    def forward_backward(self):
        """zero_grad + cg(x) + cross-entropy + backward; returns ``(out, loss)``."""
        self.model.zero_grad(set_to_none=True)
        out = self.graph(self.x)
        loss = self.problem.loss(out, self.y)
        loss.backward()
        return out, loss

    def sqrt_factor_bytes(self) -> int:
        """Memory of exact square-root factors of the GGN: ``C N P`` values."""
        return self.num_classes * self.n * self.num_parameters * self.x.element_size()

    def hbp_size_problem(self) -> Optional[str]:
        """Why HBP would raise CurvatureSizeError (an activation above its dense limit)."""
        self.forward_backward()
        largest, where = 0, ""
        for name, tensor in self.graph.record.outputs.items():
            features = tensor[0].numel() if tensor.ndim else 1
            if features > largest:
                largest, where = features, name
        if largest > HBP_MAX_FEATURES:
            return (
                f"HBP needs dense matrices over every activation; node {where!r} has "
                f"{largest:,} features per sample > max_features={HBP_MAX_FEATURES}, so it "
                "raises CurvatureSizeError (predicted from the activation sizes, not run: "
                "curvgraph only raises after propagating the smaller matrices, which takes "
                "long on this problem)"
            )
        return None


# curvgraph ------------------------------------------------------------------------------------


def curvgraph_cell(bench: Bench, method: str, curvature: str) -> Cell:
    label = method
    cell = Cell(
        f"{method}/{curvature}" if len(METHODS[method]) > 1 else method,
        "curvgraph",
        label,
        curvature,
    )

    def compute(out_loss):
        out, loss = out_loss
        return bench.graph.curvature(loss, out, curvature=curvature, method=method)

    prepared: Dict[str, Any] = {}

    def prepare():
        if "curv" not in prepared:
            prepared["curv"] = compute(bench.forward_backward())
        return prepared["curv"]

    def product(curv):
        return curv.matvec(bench.vectors)

    if method == "exact":
        cell.measurements["total"] = (
            lambda: product(compute(bench.forward_backward())),
            None,
        )
        cell.note = "total = forward + backward + preparation + one all-block product"
    else:
        cell.measurements["total"] = (lambda: compute(bench.forward_backward()), None)
    cell.measurements["pass"] = (compute, bench.forward_backward)
    cell.measurements["product"] = (product, prepare)
    return cell


# BackPACK ---------------------------------------------------------------------------------------
