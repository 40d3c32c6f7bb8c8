"""The cost table: curvature time / gradient time and peak memory, beside the peers.

For every problem (:mod:`benchmarks.problems`), in one process and on one fixed batch, every
cell below is timed with :func:`benchmarks.timing.measure_interleaved` (all measurements of a
problem interleaved round by round, median of the timed rounds) and divided by the median of
the plain gradient ``grad`` (``zero_grad`` + ``model(x)`` + cross-entropy + ``backward``) of
the same run. A cell has up to three measurements:

- ``total``: forward + backward + curvature, all timed: for curvgraph the traced forward
  ``cg(x)``, ``loss.backward()`` and ``cg.curvature(loss, out, curvature=c, method=m)`` (for
  ``exact`` also one all-block product, since its preparation alone yields nothing); for
  BackPACK the forward and the backward pass of an extended copy of the model inside
  ``with backpack(extension)``; for curvlinops constructing the operator and what it needs
  before a product (KFAC: ``compute_kronecker_factors``, which runs its own forward and
  backward; GGN/Hessian: construction and one product, which runs forward and backward);
  for ``torch.func`` one Hessian-vector product ``jvp(grad(f))`` (forward included).
- ``pass``: the curvature computation alone, after an untimed forward + backward (curvgraph:
  ``cg.curvature(...)``, the "preparation" of ``exact``); curvlinops: the operator's
  preparation (KFAC: factors, which include its forward and backward).
- ``product``: one product with all blocks at once, one vector per parameter
  (``curv.matvec({name: v})``), from a curvature prepared once beforehand (BackPACK
  ``GGNMP``/``HMP``/``PCHMP``: the stored multiplication functions of every parameter;
  curvlinops ``op @ v`` with the flattened vector).

A cell that cannot run says ``n/a`` and why: the library is not installed, it raised (the
message is recorded, e.g. an unsupported layer or ``CurvatureSizeError``), a dense matrix or a
factor would exceed the memory budget, or a call would exceed the time budget of the suite.
The first call of every measurement is a probe (and counts as a warm-up): it measures peak
memory (:func:`benchmarks.timing.peak_memory`) and time, runs under a time limit, and catches
every exception. Goals of issue 4 are evaluated on ``mnist_mlp`` and ``cifar10_3c3d``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import math
import re
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

import curvgraph
from benchmarks.foundation import BUSY, MIN_CONTENTION_WALL_S, _busy, _fmt, _mib, _share
from benchmarks.problems import PROBLEMS, Problem
from benchmarks.timing import (
    MEMORY_KINDS,
    contention,
    cpu_snapshot,
    measure_interleaved,
    memory_method,
    peak_memory,
)
from benchmarks.timing import ratio as ratio_of

__all__ = [
    "CURVATURES",
    "METHODS",
    "PEERS",
    "SUITES",
    "CostConfig",
    "config_for",
    "markdown",
    "plot",
    "run",
]

CURVATURES = ("ggn", "pch-abs", "pch-clip", "hessian")
#: curvgraph methods (design 3.2-3.4) and the curvatures each applies to
METHODS = {
    "hbp": CURVATURES,
    "kfra": ("ggn",),
    "exact": CURVATURES,
    "sqrt": ("ggn",),
    "diag": ("ggn",),
    "kflr": ("ggn",),
    "kfac": ("ggn",),
}
PEERS = ("backpack", "curvlinops", "torch.func")
MEASUREMENTS = ("total", "pass", "product")
GOAL_PROBLEMS = ("mnist_mlp", "cifar10_3c3d")
HBP_MAX_FEATURES = 8192  # curvgraph's default max_features of method="hbp"
SEED = 0


@dataclass
class CostConfig:
    """What the cost section measures (see :data:`SUITES` for the presets).

    Attributes:
        suite: name of the preset.
        problems: problem name -> batch size N.
        methods: curvgraph methods (each with its peers' rows).
        curvatures: per method, the curvatures measured (subset of :data:`METHODS`).
        peers: peer libraries to include.
        repeats: timed rounds; warmup: untimed rounds after the probe call.
        cell_budget_s: longest a single call may take (the probe is interrupted after it).
        problem_budget_s: all timed calls of a problem together (estimated from the probes);
            ``problem_budgets`` overrides it per problem.
        memory_budget_gib: largest square-root factor (``C N P`` values) the suite builds.
        predict_hbp_size: skip ``hbp``/``kfra`` without running them when an activation has
            more features than HBP's dense limit (they would raise ``CurvatureSizeError``).
        skip: ``(problem, group) -> reason`` of groups the preset leaves out.
        notes: lines for the report (what the preset reduces).
    """

    suite: str
    problems: Dict[str, int]
    methods: Tuple[str, ...] = tuple(METHODS)
    curvatures: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(METHODS))
    peers: Tuple[str, ...] = PEERS
    repeats: int = 3
    warmup: int = 0
    cell_budget_s: float = 20.0
    problem_budget_s: float = 120.0
    problem_budgets: Dict[str, float] = field(default_factory=dict)
    memory_budget_gib: float = 2.0
    predict_hbp_size: bool = True
    skip: Dict[Tuple[str, str], str] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    data_dir: Optional[str] = None


_QUICK_SKIP = "left out of the quick suite to keep it within its time budget (--suite full)"

#: presets: the quick suite must take about 4 minutes on 2 CPU cores, smoke seconds
SUITES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(
        problems={"seed_logreg": 32},
        methods=("hbp", "exact", "kfac"),
        curvatures={"hbp": ("ggn",), "exact": ("ggn", "hessian"), "kfac": ("ggn",)},
        repeats=2,
        warmup=0,
        cell_budget_s=30.0,
        problem_budget_s=60.0,
        memory_budget_gib=0.5,
        notes=("smoke configuration for tests: one tiny problem, 2 repeats, three methods",),
    ),
    "quick": dict(
        problems={"seed_logreg": 500, "mnist_mlp": 128, "cifar10_3c3d": 128, "small_resnet": 128},
        repeats=3,
        warmup=0,
        cell_budget_s=10.0,
        problem_budget_s=30.0,
        problem_budgets={"cifar10_3c3d": 120.0},
        memory_budget_gib=2.0,
        skip={("cifar10_3c3d", "exact/pch-clip"): _QUICK_SKIP},
        notes=(
            "quick suite: problems seed_logreg, mnist_mlp, cifar10_3c3d and small_resnet "
            "(mnist_mlp_sigmoid, fmnist_2c2d and sigmoid_cnn only in --suite full), each at "
            "its own N; 3 timed rounds after the probe call; no exact pch-clip row on "
            "cifar10_3c3d; square-root factors above 2 GiB and HBP beyond its dense size "
            "limit are not run; a call over 10 s is stopped",
        ),
    ),
    "full": dict(
        problems={name: problem.batch_size for name, problem in PROBLEMS.items()},
        repeats=10,
        warmup=1,
        cell_budget_s=120.0,
        problem_budget_s=900.0,
        memory_budget_gib=6.0,
        notes=(
            "full suite: every problem at its own batch size, 10 timed rounds after one "
            "warm-up round; square-root factors above 6 GiB and HBP beyond its dense size "
            "limit are not run; a call over 120 s is stopped",
        ),
    ),
}


def config_for(
    suite: str,
    problems: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    peers: Optional[Sequence[str]] = None,
    device: str = "cpu",
    repeats: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> CostConfig:
    """The preset ``suite`` restricted to ``problems`` / ``methods`` / ``peers`` if given."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    preset = dict(SUITES[suite])
    chosen = dict(preset.pop("problems"))
    if problems:
        unknown = [p for p in problems if p not in PROBLEMS]
        if unknown:
            raise ValueError(f"unknown problems {unknown}; choose from {', '.join(PROBLEMS)}")
        chosen = {p: chosen.get(p, PROBLEMS[p].batch_size) for p in problems}
    config = CostConfig(suite=suite, problems=chosen, device=device, data_dir=data_dir, **preset)
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        config.methods = tuple(methods)
    config.curvatures = {m: tuple(config.curvatures.get(m, METHODS[m])) for m in config.methods}
    if peers is not None:
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
        config.peers = tuple(peers)
    if repeats is not None:
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        config.repeats = repeats
    return config


# -- cells -----------------------------------------------------------------------------------


#: beginnings of ``missing`` entries that explain an empty column rather than a failure
_INFO = ("BackPACK computes", "the factor computation", "nothing to", "BackPACK stores")


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
        return f"{self.library}:{self.label}:{self.curvature}"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(distribution: str) -> Optional[str]:
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


def _curvgraph_cell(bench: Bench, method: str, curvature: str) -> Cell:
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


def _backpack_cells(bench: Bench, groups: List[str]) -> List[Cell]:
    """BackPACK's rows for the curvgraph groups in ``groups``."""
    wanted = set(groups)
    specs: List[Tuple[str, str, str, Callable[[], Any], str]] = []  # group, label, curv, ext
    if not _installed("backpack"):
        reason = "not installed (pip install backpack-for-pytorch)"
        return [Cell(g, "backpack", "BackPACK", "-", reason=reason) for g in groups]
    from backpack import extensions as E
    from backpack.extensions.secondorder.hbp import (
        BackpropStrategy,
        ExpectationApproximation,
        LossHessianStrategy,
    )

    def hbp(curvature: str, ea: str):
        return lambda: E.HBP(curvature, LossHessianStrategy.SUM, BackpropStrategy.BATCH_AVERAGE, ea)

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
    cells = []
    runner: Dict[str, _BackpackRunner] = {}

    def get_runner() -> _BackpackRunner:
        if "pass" not in runner:
            runner["pass"] = _BackpackRunner(bench)
        return runner["pass"]

    for group, label, curvature, make, extra in specs:
        if group not in wanted:
            continue
        cell = Cell(group, "backpack", label, curvature)
        cell.measurements["total"] = (lambda make=make: get_runner()(make()), None)
        cell.missing["pass"] = "BackPACK computes it during the backward pass (see total)"
        if extra in ("ggnmp", "hmp", "pchmp"):
            field_name = extra
            prepared: Dict[str, Any] = {}

            def prepare(make=make, prepared=prepared):
                if "runner" not in prepared:  # own copy: its stored functions stay valid
                    prepared["runner"] = _BackpackRunner(bench)
                    prepared["runner"](make(), keep=True)
                return prepared["runner"]

            def product(r, field_name=field_name):
                return [
                    getattr(p, field_name)(bench.vectors[name].unsqueeze(0))
                    for name, p in r.model.named_parameters()
                ]

            cell.measurements["product"] = (product, prepare)
            cell.note = f"products with the functions stored in param.{field_name}"
        else:
            cell.missing["product"] = "BackPACK stores the curvature; it offers no product"
        if label.startswith("SqrtGGNExact"):
            cell.note = "stores C x N x (parameter) factors"
        elif extra:
            cell.note = cell.note or extra
        cells.append(cell)
    return cells


# curvlinops ----------------------------------------------------------------------------------


def _curvlinops_cells(bench: Bench, groups: List[str]) -> List[Cell]:
    wanted = set(groups)
    if not _installed("curvlinops"):
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


def _torch_func_cells(bench: Bench, groups: List[str]) -> List[Cell]:
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


# -- running -------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise :class:`CellTimeout` in the main thread after ``seconds`` (Unix; else no limit)."""
    usable = (
        seconds is not None
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise CellTimeout(f"one call took longer than {seconds:.0f} s (the cell's time limit)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: explanations of errors the peers are known to raise (appended to the recorded message)
_HINTS = (
    (
        "expects a backpropagation quantity but it is None",
        "BackPACK backpropagates through module hooks of sequential models only; the "
        "residual `+` is no module, so nothing reaches this layer",
    ),
    (
        'transpose() missing 2 required positional argument: "dim0", "dim1" (at linear.py',
        "a bug in BackPACK's HBP with ExpectationApproximation.CHEN (hbp/linear.py calls "
        "Tensor.transpose() without dimensions)",
    ),
    (
        "AssertionError:  (at hbpbase.py:50)",
        "BackPACK's HBP adds the residual diagonal of an activation only for flat features; "
        "after a convolution the activation is [C, H, W]",
    ),
    (
        "must be tuple of ints, but found element of type str",
        "BackPACK does not accept Conv2d(padding='same')",
    ),
)


def _error(err: BaseException) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    message = re.sub(r" at 0x[0-9a-f]+", "", message)  # object addresses differ per call
    where = ""
    tb = traceback.extract_tb(err.__traceback__)
    if tb:
        frame = tb[-1]
        where = f" (at {Path(frame.filename).name}:{frame.lineno})"
    text = f"raises {type(err).__name__}: {message}{where}"
    for pattern, hint in _HINTS:
        if pattern in text:
            text += f" — {hint}"
    return text if len(text) <= 600 else text[:597] + "..."


def _probe(fn: Callable, setup: Optional[Callable], device, limit: float):
    """One call: ``(peak memory, seconds of setup + call)``; raises what the call raises.

    The seconds are taken around ``setup`` and ``fn`` themselves, not around the memory
    bookkeeping (``malloc_trim`` can take seconds on a large fragmented heap).
    """
    spent = [0.0]

    def timed(f):
        def call(*args):
            start = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - start

        return call

    with time_limit(limit):
        memory = peak_memory(timed(fn), device, setup=timed(setup) if setup else None)
    return memory, spent[0]


def _groups(config: CostConfig) -> List[str]:
    groups = []
    for method in config.methods:
        curvatures = config.curvatures.get(method, METHODS[method])
        if len(METHODS[method]) > 1:
            groups += [f"{method}/{c}" for c in CURVATURES if c in curvatures]
        else:
            groups.append(method)
    return groups


def _cells(bench: Bench, config: CostConfig, groups: List[str]) -> List[Cell]:
    cells = []
    for group in groups:
        method, _, curvature = group.partition("/")
        cells.append(_curvgraph_cell(bench, method, curvature or "ggn"))
    peers = []
    if "backpack" in config.peers:
        peers += _backpack_cells(bench, groups)
    if "curvlinops" in config.peers:
        peers += _curvlinops_cells(bench, groups)
    if "torch.func" in config.peers:
        peers += _torch_func_cells(bench, groups)
    order = {g: i for i, g in enumerate(groups)}
    cells += peers
    cells.sort(key=lambda c: order.get(c.group, len(order)))  # stable: curvgraph first
    return cells


def _reasons_before_running(
    bench: Bench, cell: Cell, config: CostConfig, name: str, hbp_problem: Optional[str]
) -> Optional[str]:
    """Why ``cell`` is not run at all (preset, memory or size prediction), or None."""
    skip = config.skip.get((name, cell.group)) or config.skip.get((name, cell.group.split("/")[0]))
    if skip:
        return skip
    budget = config.memory_budget_gib * 2**30
    if cell.group == "sqrt" and cell.library in ("curvgraph", "backpack"):
        need = bench.sqrt_factor_bytes()
        if need > budget:
            return (
                f"the exact square-root factors hold C x N x P = {bench.num_classes} x "
                f"{bench.n} x {bench.num_parameters:,} values ({need / 2**30:.1f} GiB), above "
                f"the suite's memory budget of {config.memory_budget_gib:g} GiB"
            )
    if cell.group.split("/")[0] in ("hbp", "kfra") and config.predict_hbp_size and hbp_problem:
        if cell.library == "curvgraph":
            return hbp_problem
        if cell.library == "backpack" and not cell.label.startswith("HBP (CHEN"):
            return (
                f"not run: BackPACK's {cell.label.split(' ')[0]} propagates dense matrices "
                "over the activations too (above HBP's size limit here, see curvgraph's "
                "row), which takes minutes per call"
            )
    return None


def _measure(
    bench: Bench,
    cells: List[Cell],
    config: CostConfig,
    name: str,
    progress: Optional[tqdm],
    hbp_problem: Optional[str],
) -> Dict[str, Any]:
    """Probe, budget and time ``cells`` beside the gradient of ``bench``; rows and baselines."""
    device = bench.device
    calls = 1 + config.warmup + config.repeats  # probe + warm-up + timed

    def advance(label: str) -> None:
        if progress is not None:
            progress.set_description(f"cost {name}: {label}"[:60], refresh=False)
            progress.update()

    # 1. baselines and probes (the probe is the first call: memory, time, errors)
    baseline = {"grad": (bench.grad_plain, None), "grad_traced": (bench.forward_backward, None)}
    memory: Dict[str, Dict[str, Any]] = {}
    probe_s: Dict[str, float] = {}
    for key, (fn, setup) in baseline.items():
        memory[key], probe_s[key] = _probe(fn, setup, device, config.cell_budget_s)
        advance(key)
    plan: Dict[str, Tuple[Callable, Optional[Callable]]] = dict(baseline)
    for cell in cells:
        if cell.reason is None:
            cell.reason = _reasons_before_running(bench, cell, config, name, hbp_problem)
        if cell.reason is not None:
            cell.measurements.clear()
            advance(cell.key)
            continue
        for m in MEASUREMENTS:
            if m not in cell.measurements:
                continue
            fn, setup = cell.measurements[m]
            key = f"{cell.key}:{m}"
            try:
                memory[key], probe_s[key] = _probe(fn, setup, device, config.cell_budget_s)
            except CellTimeout as err:
                cell.missing[m] = f"would exceed the time budget: {err}"
                cell.measurements.pop(m)
            except Exception as err:  # noqa: BLE001 - any failure is a result
                cell.missing[m] = _error(err)
                cell.measurements.pop(m)
            advance(key)
        if not cell.measurements:  # every measurement failed: the cell's reason is theirs
            failures = [r for r in cell.missing.values() if not r.startswith(_INFO)]
            cell.reason = "; ".join(dict.fromkeys(failures or cell.missing.values()))
    # 2. time budget: drop the most expensive measurements until the estimate fits
    est = {key: probe_s[key] * (config.warmup + config.repeats) for key in probe_s}
    kept = [(cell, m) for cell in cells for m in cell.measurements]
    total_est = sum(est[k] for k in baseline) + sum(est[f"{c.key}:{m}"] for c, m in kept)
    budget = config.problem_budgets.get(name, config.problem_budget_s)
    for cell, m in sorted(kept, key=lambda cm: -est[f"{cm[0].key}:{cm[1]}"]):
        if total_est <= budget:
            break
        key = f"{cell.key}:{m}"
        cell.measurements.pop(m)
        cell.missing[m] = (
            f"would exceed the time budget of the {config.suite} suite: one call took "
            f"{probe_s[key]:.1f} s, {config.warmup + config.repeats} more calls ≈ "
            f"{est[key]:.0f} s (all calls of the problem ≈ {total_est:.0f} s > its budget "
            f"{budget:.0f} s)"
        )
        total_est -= est[key]
        if not cell.measurements:
            cell.reason = cell.missing[m]
    for cell in cells:
        for m, (fn, setup) in cell.measurements.items():
            plan[f"{cell.key}:{m}"] = (fn, setup)
    if progress is not None:
        skipped = sum(calls - 1 for c in cells for m in MEASUREMENTS if m not in c.measurements)
        progress.total = max(progress.total - skipped, progress.n)
        progress.refresh()

    # 3. the timed rounds, interleaved; a failure in a later call marks the measurement
    errors: Dict[str, str] = {}

    def guarded(key: str, fn: Callable, setup: Optional[Callable]):
        def run_setup():
            if key in errors:
                return None
            try:
                return setup()
            except Exception as err:  # noqa: BLE001
                errors[key] = _error(err)
                return None

        def run(*args):
            if key in errors:
                return None
            try:
                return fn(*args)
            except Exception as err:  # noqa: BLE001
                errors[key] = _error(err)
                return None

        return run, (run_setup if setup is not None else None)

    guarded_plan = {key: guarded(key, fn, setup) for key, (fn, setup) in plan.items()}
    before = cpu_snapshot()
    timings = measure_interleaved(
        guarded_plan, config.repeats, config.warmup, device, callback=advance
    )
    busy = contention(before, cpu_snapshot())
    if "grad" in errors:
        raise RuntimeError(f"{name}: the gradient itself fails: {errors['grad']}")

    grad = timings["grad"]["median_s"]
    rows = []
    for cell in cells:
        row: Dict[str, Any] = {
            "group": cell.group,
            "library": cell.library,
            "method": cell.label,
            "curvature": cell.curvature,
            "status": "ok",
            "reason": None,
            "note": cell.note,
            "ratios": {},
            "timings": {},
            "memory": {},
            "not_measured": {},
            "probe_s": {
                m: probe_s[f"{cell.key}:{m}"] for m in MEASUREMENTS if f"{cell.key}:{m}" in probe_s
            },
        }
        for m in MEASUREMENTS:
            key = f"{cell.key}:{m}"
            if key in errors:
                cell.missing[m] = errors[key]
            if m in cell.measurements and key not in errors:
                row["timings"][m] = timings[key]
                row["memory"][m] = memory[key]
                row["ratios"][m] = ratio_of(timings[key]["median_s"], grad)
            elif m in cell.missing:
                row["not_measured"][m] = cell.missing[m]
        if not row["ratios"]:
            row["status"] = "n/a"
            row["reason"] = cell.reason or "; ".join(dict.fromkeys(cell.missing.values()))
        rows.append(row)
    return {
        "baseline": {k: timings[k] for k in baseline},
        "baseline_memory": {k: memory[k] for k in baseline},
        "ratios": {"grad_traced/grad": ratio_of(timings["grad_traced"]["median_s"], grad)},
        "rows": rows,
        "contention": busy,
    }


def _reduced_sqrt_batch(bench: Bench, config: CostConfig) -> Optional[int]:
    """The largest power of two N' >= 8 whose sqrt factors fit the memory budget, if < N."""
    per_sample = bench.sqrt_factor_bytes() / bench.n
    fits = int(config.memory_budget_gib * 2**30 // per_sample)
    if fits >= bench.n or fits < 8:
        return None
    return 2 ** int(math.log2(fits))


def run_problem(
    name: str, n: int, config: CostConfig, progress: Optional[tqdm] = None
) -> Dict[str, Any]:
    """Every cell of ``name`` at batch size ``n``; the problem's results.

    When the square-root factors at ``N`` exceed the memory budget, the ``sqrt`` rows
    (curvgraph ``sqrt`` and BackPACK ``SqrtGGNExact``) are measured again at the largest
    power-of-two batch ``N'`` that fits, beside a gradient at ``N'`` (rows with
    ``batch_size`` N').
    """
    problem = PROBLEMS[name]
    started = time.perf_counter()
    bench = Bench(problem, n, config)
    groups = _groups(config)
    cells = _cells(bench, config, groups)
    hbp_problem = bench.hbp_size_problem() if config.predict_hbp_size else None
    measured = _measure(bench, cells, config, name, progress, hbp_problem)
    for row in measured["rows"]:
        row["batch_size"] = n
    reduced = None
    if "sqrt" in groups and (name, "sqrt") not in config.skip:
        small = _reduced_sqrt_batch(bench, config)
        if small is not None:
            del bench, cells
            gc.collect()
            bench_small = Bench(problem, small, config)
            sqrt_cells = [c for c in _cells(bench_small, config, ["sqrt"])]
            for c in sqrt_cells:
                c.label = f"{c.label} at N = {small}"
            reduced = _measure(bench_small, sqrt_cells, config, name, progress, None)
            reduced["batch_size"] = small
            for row in reduced["rows"]:
                row["batch_size"] = small
                row["note"] = (
                    f"at N = {small} (the factors at N = {n} exceed the memory budget); "
                    f"ratios relative to the gradient at N = {small}"
                )
            rows = measured["rows"]
            last = max(i for i, r in enumerate(rows) if r["group"] == "sqrt")
            rows[last + 1 : last + 1] = reduced["rows"]
    data = problem.data(config.data_dir)
    result = {
        "status": "ok",
        "title": problem.title,
        "batch_size": n,
        "default_batch_size": problem.batch_size,
        "num_parameters": sum(p.numel() for p in problem.build_model().parameters()),
        "data": data,
        "model": repr(problem.build_model()),
        **measured,
        "wall_s": time.perf_counter() - started,
    }
    if reduced is not None:
        result["reduced_sqrt"] = {
            k: reduced[k] for k in ("batch_size", "baseline", "ratios", "contention")
        }
    return result


def _find(rows: List[Dict[str, Any]], library: str, group: str) -> Optional[Dict[str, Any]]:
    """The first measured row of ``library`` in ``group`` (else the first row, else None)."""
    candidates = [r for r in rows if r["library"] == library and r["group"] == group]
    return next((r for r in candidates if r["status"] == "ok"), None) or next(
        iter(candidates), None
    )


def _why(row: Optional[Dict[str, Any]], m: str) -> str:
    if row is None:
        return "row not in this run"
    return row["not_measured"].get(m) or row["reason"] or "not measured"


def _median(row: Optional[Dict[str, Any]], m: str) -> Optional[float]:
    if row is None or m not in row["timings"]:
        return None
    return row["timings"][m]["median_s"]


def _goal(
    problem: str,
    text: str,
    measured_as: str,
    row: Optional[Dict[str, Any]],
    m: str,
    at_most: float,
    peer: Optional[Dict[str, Any]] = None,
    peer_measurement: Optional[str] = None,
) -> Dict[str, Any]:
    """One goal: ``row``'s ratio ``m`` (or its median over ``peer``'s) against ``at_most``."""
    entry: Dict[str, Any] = {
        "problem": problem,
        "goal": text,
        "measured_as": measured_as,
        "at_most": at_most,
        "value": None,
        "status": "not measured",
        "reason": None,
        "group": row["group"] if row else None,
    }
    if peer_measurement is not None:
        a, b = _median(row, m), _median(peer, peer_measurement)
        if a is None:
            entry["reason"] = f"curvgraph: {_why(row, m)}"
        elif b is None:
            entry["reason"] = f"peer: {_why(peer, peer_measurement)}"
        else:
            entry["value"] = ratio_of(a, b)
    elif row is not None and m in row["ratios"]:
        entry["value"] = row["ratios"][m]
    else:
        entry["reason"] = _why(row, m)
    if entry["value"] is not None and math.isfinite(entry["value"]):
        entry["status"] = "met" if entry["value"] <= at_most else "not met"
    return entry


def _evaluate_goals(problems: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 4's performance goals on :data:`GOAL_PROBLEMS`: met / not met / not measured.

    - ``kfac`` pass alone <= 2 gradients;
    - ``kfac`` (forward + backward + pass) <= 0.5 x BackPACK's KFAC (forward + backward);
    - ``kflr``, ``sqrt`` (same) <= BackPACK's KFLR, SqrtGGNExact;
    - ``exact`` all-block product (GGN, Hessian) <= 2 gradients;
    - all-block product from prepared Kronecker blocks (``kfac``, ``kflr``) <= 0.1 gradient.
    """
    goals = []
    for name in GOAL_PROBLEMS:
        if name not in problems or "rows" not in problems[name]:
            continue
        rows = problems[name]["rows"]
        kfac, kflr = _find(rows, "curvgraph", "kfac"), _find(rows, "curvgraph", "kflr")
        goals.append(
            _goal(name, "kfac pass <= 2x gradient", "kfac pass / gradient", kfac, "pass", 2.0)
        )
        for group, peer in (("kfac", "KFAC"), ("kflr", "KFLR"), ("sqrt", "SqrtGGNExact")):
            at_most = 0.5 if group == "kfac" else 1.0
            text = f"{group} <= {'0.5x ' if group == 'kfac' else ''}BackPACK {peer}"
            goals.append(
                _goal(
                    name,
                    text,
                    f"curvgraph (fwd+bwd+{group}) / BackPACK (fwd+bwd with {peer})",
                    _find(rows, "curvgraph", group),
                    "total",
                    at_most,
                    _find(rows, "backpack", group),
                    "total",
                )
            )
        for entry in goals:
            row = _find(rows, "curvgraph", entry["group"] or "")
            if (
                entry["problem"] == name
                and row
                and row.get("batch_size")
                not in (
                    None,
                    problems[name].get("batch_size"),
                )
            ):
                entry["measured_as"] += f", at N = {row['batch_size']}"
        for c in ("ggn", "hessian"):
            goals.append(
                _goal(
                    name,
                    f"exact all-block product ({c}) <= 2x gradient",
                    "product / gradient",
                    _find(rows, "curvgraph", f"exact/{c}"),
                    "product",
                    2.0,
                )
            )
        for group, row in (("kfac", kfac), ("kflr", kflr)):
            goals.append(
                _goal(
                    name,
                    f"{group} all-block product from prepared Kronecker blocks <= 0.1x gradient",
                    "product / gradient",
                    row,
                    "product",
                    0.1,
                )
            )
    return goals


def run(config: CostConfig, progress: bool = True) -> Dict[str, Any]:
    """The cost section: every problem of ``config``; a JSON-serialisable dictionary."""
    started = time.perf_counter()
    groups = _groups(config)
    rounds = 1 + config.warmup + config.repeats
    # upper bound for the progress bar (skipped cells shrink it)
    per_problem = 2 * rounds + len(groups) * 3 * rounds * (1 + len(config.peers))
    result: Dict[str, Any] = {
        "status": "ok",
        "config": {
            "suite": config.suite,
            "problems": dict(config.problems),
            "methods": list(config.methods),
            "curvatures": {m: list(c) for m, c in config.curvatures.items()},
            "peers": list(config.peers),
            "repeats": config.repeats,
            "warmup": config.warmup,
            "probe": "one extra first call per measurement (peak memory, errors, time limit)",
            "cell_budget_s": config.cell_budget_s,
            "problem_budget_s": config.problem_budget_s,
            "problem_budgets": dict(config.problem_budgets),
            "memory_budget_gib": config.memory_budget_gib,
            "predict_hbp_size": config.predict_hbp_size,
            "skip": {f"{p}:{g}": r for (p, g), r in config.skip.items()},
            "device": config.device,
            "dtype": config.dtype,
            "seed": SEED,
            "notes": list(config.notes),
        },
        "peers": {
            "backpack": _version("backpack-for-pytorch") if _installed("backpack") else None,
            "curvlinops": _version("curvlinops-for-pytorch") if _installed("curvlinops") else None,
            "torch.func": torch.__version__,
        },
        "memory_kind": memory_method(config.device),
        "memory_description": MEMORY_KINDS[memory_method(config.device)],
        "definitions": DEFINITIONS,
        "problems": {},
    }
    start = cpu_snapshot()
    total = per_problem * len(config.problems)
    with warnings.catch_warnings():
        # BackPACK's hooks on a model whose inputs need no gradient, and its torch.jit use
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        _run_problems(result, config, total, progress)
    result["goals"] = _evaluate_goals(result["problems"])
    result["contention"] = contention(start, cpu_snapshot())
    result["wall_s"] = time.perf_counter() - started
    return result


def _run_problems(result: Dict[str, Any], config: CostConfig, total: int, progress: bool):
    with tqdm(total=total, unit="call", disable=not progress, desc="cost") as bar:
        for name, n in config.problems.items():
            try:
                gc.collect()
                result["problems"][name] = run_problem(name, n, config, bar)
            except Exception as err:  # noqa: BLE001 - one problem failing is a result
                result["problems"][name] = {
                    "status": "failed",
                    "error": _error(err),
                    "traceback": traceback.format_exc(),
                }
                result["status"] = "partial"


DEFINITIONS = {
    "grad": "plain gradient: zero_grad + model(x) + cross-entropy (mean) + backward; the "
    "denominator of every ratio",
    "grad_traced": "the same through curvgraph's traced graph cg(x)",
    "total": "forward + backward + curvature, all timed (curvgraph: cg(x), backward, "
    "cg.curvature; exact: + one all-block product; BackPACK: extended forward + backward in "
    "`with backpack(ext)`; curvlinops: operator construction + factors, or + one product for "
    "GGN/Hessian; torch.func: one Hessian-vector product)",
    "pass": "the curvature computation alone after an untimed forward + backward (exact: its "
    "preparation)",
    "product": "one product with every block at once, one vector per parameter, from a "
    "curvature prepared beforehand",
    "ratio": "median of the measurement / median of grad, same run, interleaved rounds",
    "memory": "peak memory delta of the probe call of the total measurement (or the first "
    "measured one)",
}


# -- report ------------------------------------------------------------------------------------


def _note(notes: List[str], text: str) -> int:
    """The footnote number of ``text`` (added once)."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def _cell(row: Dict[str, Any], m: str, notes: List[str]) -> str:
    if m in row["ratios"]:
        return _fmt(row["ratios"][m])
    reason = row["not_measured"].get(m)
    if reason is None:
        return "—"
    if reason.startswith(_INFO):
        return "—"
    if row["status"] == "n/a":
        return "n/a"
    return f"n/a [{_note(notes, reason)}]"


def _memory(row: Dict[str, Any]) -> str:
    for m in MEASUREMENTS:
        if m in row["memory"]:
            return _mib(row["memory"][m]["delta_bytes"])
    return ""


def _contention(row: Dict[str, Any]) -> Optional[Dict[str, float]]:
    for m in MEASUREMENTS:
        if m in row["timings"]:
            return row["timings"][m]["contention"]
    return None


def _library(name: str) -> str:
    return {"backpack": "BackPACK", "curvlinops": "curvlinops"}.get(name, name)


def problem_markdown(name: str, result: Dict[str, Any], goals: List[Dict[str, Any]]) -> str:
    """One problem's table (rows grouped by the curvgraph method they sit by)."""
    if result.get("status") == "failed":
        return f"### {name}\n\n**Failed:** {result['error']}\n"
    data = result["data"]
    grad = result["baseline"]["grad"]
    n_note = ""
    if result["batch_size"] != result["default_batch_size"]:
        n_note = f" (reduced from the problem's N = {result['default_batch_size']})"
    dataset = f"**synthetic** ({data['dataset']})" if data["synthetic"] else data["dataset"]
    lines = [
        f"### {name}: {result['title']}",
        "",
        f"N = {result['batch_size']}{n_note}, {result['num_parameters']:,} parameters; data: "
        f"{dataset}. Gradient: median {grad['median_s'] * 1e3:.3g} ms "
        f"(q25–q75 {grad['q25_s'] * 1e3:.3g}–{grad['q75_s'] * 1e3:.3g} ms); traced gradient "
        f"/ gradient = {_fmt(result['ratios']['grad_traced/grad'])}. Other processes used "
        f"{_share(result['contention'])} of the CPUs during the timed rounds.",
        "",
        "| quantity | library | computation | total / grad | pass / grad | product / grad | "
        "peak Δ mem [MiB] | others' CPU | goal |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    notes: List[str] = []
    by_group: Dict[str, List[str]] = {}
    for g in goals:
        if g["problem"] == name and g["group"]:
            mark = {"met": "met", "not met": "**not met**"}.get(g["status"], "not measured")
            value = _fmt(g["value"]) if g["value"] is not None else "–"
            by_group.setdefault(g["group"], []).append(f"{g['goal']}: {value} {mark}")
    shown_goal = set()
    for row in result["rows"]:
        quantity = row["group"] if row["library"] == "curvgraph" else ""
        goal = ""
        if row["library"] == "curvgraph" and row["group"] not in shown_goal:
            goal = "; ".join(by_group.get(row["group"], []))
            shown_goal.add(row["group"])
        if row["status"] == "n/a":
            cells = [f"n/a [{_note(notes, row['reason'])}]", "", ""]
        else:
            cells = [_cell(row, m, notes) for m in MEASUREMENTS]
        method = row["method"]
        if row["note"]:
            method += f" [{_note(notes, row['note'])}]"
        lines.append(
            f"| {quantity} | {_library(row['library'])} | {method} | {' | '.join(cells)} | "
            f"{_memory(row)} | {_share(_contention(row))} | {goal} |"
        )
    if notes:
        lines += ["", "Notes and reasons for n/a:", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
    """The cost section of the report."""
    config = result["config"]
    lines = [
        "## Cost: curvature time / gradient time",
        "",
        f"Median of {config['repeats']} timed rounds after {config['warmup']} warm-up "
        "round(s) and one probe call per measurement; all measurements of a problem "
        "interleaved round by round in one process on one fixed batch; ratios are medians "
        "divided by the median of the plain gradient of the same run. Peers: "
        + ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in result["peers"].items())
        + f". Memory: {result['memory_kind']} (peak minus level before the call). "
        f"Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in result["definitions"].items()]
    for note in config.get("notes", []):
        lines += ["", f"*{note}.*"]
    goals = result.get("goals", [])
    if goals:
        lines += [
            "",
            "### Goals of issue 4",
            "",
            "| problem | goal | measured as | value | status |",
            "|---|---|---|---:|---|",
        ]
        for g in goals:
            value = _fmt(g["value"]) if g["value"] is not None else "–"
            status = g["status"] + (f" ({g['reason']})" if g["reason"] else "")
            lines.append(
                f"| {g['problem']} | {g['goal']} | {g['measured_as']} | {value} | {status} |"
            )
    busy = []
    for name, problem in result["problems"].items():
        if "rows" in problem and _busy(problem["contention"], 0.0):
            busy.append(f"{name} ({_share(problem['contention'])})")
    if busy:
        lines += [
            "",
            f"**Contention:** other processes took more than {BUSY:.0%} of the CPUs during "
            f"the timed rounds of {', '.join(busy)}; those ratios are distorted (all "
            "measurements of a problem are interleaved, so they are distorted alike, but "
            "small parallel kernels suffer most). Rerun on a quiet machine. Shares over "
            f"less than {MIN_CONTENTION_WALL_S} s of timed calls show as '–'.",
        ]
    for name, problem in result["problems"].items():
        lines += ["", problem_markdown(name, problem, goals)]
    return "\n".join(lines) + "\n"


_COLORS = {
    "curvgraph": "tab:blue",
    "backpack": "tab:orange",
    "curvlinops": "tab:green",
    "torch.func": "tab:purple",
}


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """One PNG: per problem, the total / gradient ratio of every measured row (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    problems = {k: v for k, v in result["problems"].items() if "rows" in v}
    if not problems:
        return []
    heights = [max(2.0, 0.22 * len(p["rows"]) + 1.0) for p in problems.values()]
    fig = Figure(figsize=(9, sum(heights)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(problems), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, problem) in zip(axes[:, 0], problems.items()):
        rows = [r for r in problem["rows"] if "total" in r["ratios"]]
        labels = [f"{r['library']}: {r['method'][:38]} ({r['curvature']})" for r in rows]
        values = [r["ratios"]["total"] for r in rows]
        colors = [_COLORS.get(r["library"], "gray") for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(
            f"{name} (N = {problem['batch_size']}): (fwd + bwd + curvature) / gradient", fontsize=8
        )
        for i, v in enumerate(values):
            ax.text(v, i, f" {_fmt(v)}", va="center", fontsize=6)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cost.png"
    fig.savefig(path, dpi=110)
    return [path]
