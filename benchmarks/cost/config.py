"""Presets of the cost section and the definitions its report prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from benchmarks.problems import PROBLEMS

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
        fresh_memory: which rows also get their peak memory in a fresh process
            (:mod:`benchmarks.cost.fresh_memory`): ``"all"``, ``"goal"`` (curvgraph's and
            curvlinops' rows of the goal problems) or ``"none"``.
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
    fresh_memory: str = "none"
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
        fresh_memory="goal",
        notes=(
            "quick suite: problems seed_logreg, mnist_mlp, cifar10_3c3d and small_resnet "
            "(mnist_mlp_sigmoid, fmnist_2c2d and sigmoid_cnn only in --suite full), each at "
            "its own N; 3 timed rounds after the probe call; no exact pch-clip row on "
            "cifar10_3c3d; square-root factors above 2 GiB and HBP beyond its dense size "
            "limit are not run; a call over 10 s is stopped; fresh-process peak memory for "
            "curvgraph's and curvlinops' rows of mnist_mlp and cifar10_3c3d only",
        ),
    ),
    "full": dict(
        problems={name: problem.batch_size for name, problem in PROBLEMS.items()},
        repeats=10,
        warmup=1,
        cell_budget_s=120.0,
        problem_budget_s=900.0,
        memory_budget_gib=6.0,
        fresh_memory="all",
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
