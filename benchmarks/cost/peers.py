"""The peers' rows: BackPACK extensions, curvlinops operators, ``torch.func`` products."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Tuple

from benchmarks.cost.cells import Bench, Cell, installed
from benchmarks.cost.config import CURVATURES


class _BackpackRunner:
    """An extended deep copy of the model (the user's model is not touched) and of the loss."""

    def __init__(self, bench: Bench):
        import backpack

        self.bp = backpack
        self.bench = bench
        self.model = backpack.extend(copy.deepcopy(bench.model))
        self.loss = backpack.extend(bench.problem.loss_module())

    def __call__(self, extension, keep: bool = False) -> None:
        """Forward + backward inside ``with backpack(extension)``.

        Unless ``keep``, the results stored on the parameters are deleted afterwards (as the
        timing helpers release a call's return value), so extensions do not pile up memory.
        """
        self.model.zero_grad(set_to_none=True)
        with self.bp.backpack(extension):
            self.loss(self.model(self.bench.x), self.bench.y).backward()
        if not keep:
            for p in self.model.parameters():
                if hasattr(p, extension.savefield):
                    delattr(p, extension.savefield)


def backpack_cells(bench: Bench, groups: List[str]) -> List[Cell]:
    """BackPACK's rows for the curvgraph groups in ``groups``."""
    wanted = set(groups)
    if not installed("backpack"):
        reason = "not installed (pip install backpack-for-pytorch)"
        return [Cell(g, "backpack", "BackPACK", "-", reason=reason) for g in groups]
    cells = []
    runner: Dict[str, _BackpackRunner] = {}

    def get_runner() -> _BackpackRunner:
        if "pass" not in runner:
            runner["pass"] = _BackpackRunner(bench)
        return runner["pass"]

    for group, label, curvature, make, extra in _backpack_specs():
        if group in wanted:
            cells.append(_backpack_cell(bench, group, label, curvature, make, extra, get_runner))
    return cells


def _backpack_specs() -> List[Tuple[str, str, str, Callable[[], Any], str]]:
    """BackPACK's computations: (group, label, curvature, extension factory, extra)."""
    from backpack import extensions as E
    from backpack.extensions.secondorder.hbp import (
        BackpropStrategy,
        ExpectationApproximation,
        LossHessianStrategy,
    )

    def hbp(curvature: str, ea: str):
        return lambda: E.HBP(curvature, LossHessianStrategy.SUM, BackpropStrategy.BATCH_AVERAGE, ea)

    specs: List[Tuple[str, str, str, Callable[[], Any], str]] = []
    chen, botev = ExpectationApproximation.CHEN, ExpectationApproximation.BOTEV_MARTENS
    for c in CURVATURES:
        specs.append(
            (f"hbp/{c}", "HBP (CHEN: averaged Jacobians, as curvgraph hbp)", c, hbp(c, chen), "")
        )
        if c != "ggn":  # HBP(ggn, BOTEV_MARTENS) is KFRA
            specs.append(
                (f"hbp/{c}", "HBP (BOTEV_MARTENS: expected J^T H J)", c, hbp(c, botev), "")
            )
    specs += [
        ("kfra", "KFRA", "ggn", E.KFRA, ""),
        ("sqrt", "SqrtGGNExact", "ggn", E.SqrtGGNExact, ""),
        ("diag", "DiagGGNExact", "ggn", E.DiagGGNExact, ""),
        ("diag", "DiagGGNMC (mc_samples=1)", "ggn", E.DiagGGNMC, "Monte-Carlo diagonal"),
        ("kflr", "KFLR", "ggn", E.KFLR, ""),
        ("kfac", "KFAC (mc_samples=1)", "ggn", E.KFAC, ""),
        ("exact/ggn", "GGNMP", "ggn", E.GGNMP, "ggnmp"),
        ("exact/hessian", "HMP", "hessian", E.HMP, "hmp"),
        (
            "exact/pch-abs",
            "PCHMP (modify='abs')",
            "pch-abs",
            lambda: E.PCHMP(modify="abs"),
            "pchmp",
        ),
        (
            "exact/pch-clip",
            "PCHMP (modify='clip')",
            "pch-clip",
            lambda: E.PCHMP(modify="clip"),
            "pchmp",
        ),
    ]
    return specs


def _backpack_cell(
    bench: Bench,
    group: str,
    label: str,
    curvature: str,
    make: Callable[[], Any],
    extra: str,
    get_runner: Callable[[], _BackpackRunner],
) -> Cell:
    """One BackPACK row: forward + backward with the extension, and the stored products."""
    cell = Cell(group, "backpack", label, curvature)
    cell.measurements["total"] = (lambda: get_runner()(make()), None)
    cell.missing["pass"] = "BackPACK computes it during the backward pass (see total)"
    if extra in ("ggnmp", "hmp", "pchmp"):
        prepared: Dict[str, Any] = {}

        def prepare():
            if "runner" not in prepared:  # own copy: its stored functions stay valid
                prepared["runner"] = _BackpackRunner(bench)
                prepared["runner"](make(), keep=True)
            return prepared["runner"]

        def product(r):
            return [
                getattr(p, extra)(bench.vectors[name].unsqueeze(0))
                for name, p in r.model.named_parameters()
            ]

        cell.measurements["product"] = (product, prepare)
        cell.note = f"products with the functions stored in param.{extra}"
    else:
        cell.missing["product"] = "BackPACK stores the curvature; it offers no product"
    if label.startswith("SqrtGGNExact"):
        cell.note = "stores C x N x (parameter) factors"
    elif extra:
        cell.note = cell.note or extra
    return cell


# curvlinops ----------------------------------------------------------------------------------


def curvlinops_cells(bench: Bench, groups: List[str]) -> List[Cell]:
    wanted = set(groups)
    if not installed("curvlinops"):
        reason = "not installed (pip install curvlinops-for-pytorch)"
        return [Cell(g, "curvlinops", "curvlinops", "-", reason=reason) for g in groups]
    import curvlinops

    params = [p for p in bench.model.parameters() if p.requires_grad]
    data = [(bench.x, bench.y)]
    cells = []

    def operator(kind: str):
        loss = bench.problem.loss_module()
        if kind == "ggn":
            return curvlinops.GGNLinearOperator(
                bench.model, loss, params, data, check_deterministic=False
            )
        if kind == "hessian":
            return curvlinops.HessianLinearOperator(
                bench.model, loss, params, data, check_deterministic=False
            )
        op = curvlinops.KFACLinearOperator(
            bench.model,
            loss,
            params,
            data,
            check_deterministic=False,
            fisher_type="mc" if kind == "kfac" else "type-2",
        )
        op.compute_kronecker_factors()
        return op

    specs = [
        ("exact/ggn", "GGNLinearOperator (all parameters)", "ggn", "ggn"),
        ("exact/hessian", "HessianLinearOperator (all parameters)", "hessian", "hessian"),
        ("kflr", "KFACLinearOperator (fisher_type='type-2')", "ggn", "kflr"),
        ("kfac", "KFACLinearOperator (fisher_type='mc', mc_samples=1)", "ggn", "kfac"),
    ]
    for group, label, curvature, kind in specs:
        if group not in wanted:
            continue
        cell = Cell(group, "curvlinops", label, curvature)
        prepared: Dict[str, Any] = {}

        def prepare(kind=kind, prepared=prepared):
            if "op" not in prepared:
                prepared["op"] = operator(kind)
            return prepared["op"]

        def product(op):
            return op @ bench.flat

        if kind in ("ggn", "hessian"):
            cell.measurements["total"] = (lambda kind=kind: product(operator(kind)), None)
            cell.measurements["pass"] = (lambda kind=kind: operator(kind), None)
            cell.note = (
                "the full matrix (off-diagonal blocks too); each product runs its own forward "
                "and backward; total = construction + one product"
            )
        else:
            cell.measurements["total"] = (lambda kind=kind: operator(kind), None)
            cell.missing["pass"] = "the factor computation runs its own forward and backward "
            cell.missing["pass"] += "(see total)"
            cell.note = "total = construction + compute_kronecker_factors()"
        cell.measurements["product"] = (product, prepare)
        cells.append(cell)
    for c in ("pch-abs", "pch-clip"):
        if f"exact/{c}" in wanted:
            cells.append(
                Cell(
                    f"exact/{c}",
                    "curvlinops",
                    "(no operator)",
                    c,
                    reason="curvlinops has no positive-curvature Hessian (PCH)",
                )
            )
    return cells


# torch.func -----------------------------------------------------------------------------------


def torch_func_cells(bench: Bench, groups: List[str]) -> List[Cell]:
    if "exact/hessian" not in groups:
        return []
    from torch.func import functional_call, grad, jvp

    params = {name: p.detach() for name, p in bench.model.named_parameters()}

    def loss_of(parameters):
        return bench.problem.loss(functional_call(bench.model, parameters, (bench.x,)), bench.y)

    def hvp():
        return jvp(grad(loss_of), (params,), (bench.vectors,))[1]

    cell = Cell("exact/hessian", "torch.func", "jvp(grad(f)) Hessian-vector product", "hessian")
    cell.measurements["total"] = (hvp, None)
    cell.missing["pass"] = "nothing to prepare"
    cell.measurements["product"] = (hvp, None)
    cell.note = "the full Hessian (off-diagonal blocks too); forward included in each product"
    return [cell]
