"""The section's candidates: what each one computes, and its estimated size.

Every candidate is timed as ``fn(setup())`` with ``setup`` untimed (None: nothing to
prepare). :data:`CANDIDATES` lists them in report order with their library, what the timed
work is, and the ``method`` whose fresh-process peak memory belongs to it:

- ``gradient`` (the unit): ``zero_grad`` + forward + cross-entropy (mean over the ``N T``
  tokens) + ``backward`` of the plain model;
- ``gradient (traced)``: the same through ``cg = curvgraph.trace(...)``;
- ``kfac pass``: ``cg.curvature(loss, out, "ggn", method="kfac", mc_samples=1,
  kfac_approx="expand", retain_record=False)`` after an untimed traced forward +
  ``backward()`` (a training step's order and call: the record is freed as the walk passes
  it); ``kfac total``: all of it timed; ``kfac pass (record retained)``: the same call with
  the default ``retain_record=True`` (the record stays for further curvature calls);
- ``diag pass``: ``method="diag", mc_samples=1`` (Monte-Carlo diagonal), as the kfac pass;
- ``kflr pass``: ``method="kflr"`` (exact loss factors, ``V`` columns per token), as the
  kfac pass, where its loss factors fit the memory budget;
- ``exact preparation``: ``method="exact"``; ``exact product``: ``curv.matvec`` with one
  vector per block (every block), from a curvature prepared once;
- curvlinops 3.0.1 (hooks: its ``KFACLinearOperator`` has no fx backend in this version):
  ``KFACLinearOperator(fisher_type="mc", mc_samples=1, kfac_approx="expand")`` on the
  parameters of the ``nn.Linear`` modules it supports, construction +
  ``compute_kronecker_factors()`` (its own forward + backward); ``GGNLinearOperator`` and
  ``HessianLinearOperator`` on all parameters, one product ``op @ v`` (each product runs its
  own forward and backward; the full matrix, off-diagonal blocks included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from benchmarks.language_models.models import Built

__all__ = ["CANDIDATES", "Candidate", "estimated_bytes", "memory_work", "timing_plan"]


@dataclass(frozen=True)
class Candidate:
    """One row of the table: its key, library, memory method and timed work."""

    key: str
    library: str  # "torch" | "curvgraph" | "curvlinops"
    method: str  # the fresh-process memory measurement it belongs to
    work: str  # what is timed


CANDIDATES: List[Candidate] = [
    Candidate("gradient", "torch", "gradient", "zero_grad + forward + loss + backward (plain)"),
    Candidate("gradient (traced)", "curvgraph", "gradient_traced", "the same through cg"),
    Candidate(
        "kfac pass",
        "curvgraph",
        "kfac",
        "cg.curvature(kfac, expand, mc_samples=1, retain_record=False)",
    ),
    Candidate("kfac total", "curvgraph", "kfac", "traced forward + backward + kfac pass"),
    Candidate(
        "kfac pass (record retained)",
        "curvgraph",
        "kfac_retained",
        "cg.curvature(kfac, expand, mc_samples=1), retain_record=True (the default)",
    ),
    Candidate("diag pass", "curvgraph", "diag", "cg.curvature(diag, mc_samples=1)"),
    Candidate("kflr pass", "curvgraph", "kflr", "cg.curvature(kflr, expand): exact factors"),
    Candidate("exact preparation", "curvgraph", "exact", "cg.curvature(exact)"),
    Candidate("exact product", "curvgraph", "exact", "curv.matvec: one vector per block"),
    Candidate(
        "curvlinops KFAC",
        "curvlinops",
        "curvlinops_kfac",
        "KFACLinearOperator(mc, expand) + compute_kronecker_factors()",
    ),
    Candidate("curvlinops GGN product", "curvlinops", "curvlinops_ggn", "GGNLinearOperator @ v"),
    Candidate(
        "curvlinops Hessian product",
        "curvlinops",
        "curvlinops_hessian",
        "HessianLinearOperator @ v",
    ),
]

METHODS = list(dict.fromkeys(c.method for c in CANDIDATES))

KFAC_OPTIONS = dict(mc_samples=1, kfac_approx="expand")

#: kflr's peak memory over the loss-factor count of docs/sequence_losses.md (N T V^2 T
#: float32 entries), as measured on gpt2-reduced (4 x 32 tokens, V = 128: 3.7 GB for 268 MB
#: counted); the estimate a run uses to skip kflr where it would not fit
KFLR_MEASURED = 14


def curvlinops_params(built: Built) -> Tuple[List[nn.Parameter], int]:
    """Parameters of the ``nn.Linear`` modules (curvlinops' KFAC supports no others), blocks."""
    params: Dict[int, nn.Parameter] = {}
    blocks = 0
    for module in built.model.modules():
        if isinstance(module, nn.Linear):
            for p in module.parameters(recurse=False):
                if id(p) not in params:
                    params[id(p)] = p
                    blocks += 1
    return list(params.values()), blocks


def estimated_bytes(built: Built, method: str) -> Optional[int]:
    """The largest tensors ``method`` is known to allocate beyond a gradient (float32)."""
    s = built.spec
    N, T, V = s.N, s.T, s.vocab
    if method == "kflr":  # exact loss factors: N T V^2 c entries, c = T counted tokens,
        # times KFLR_MEASURED: the peak measured on gpt2-reduced (3.7 GB) over this count
        return KFLR_MEASURED * 4 * N * T * V * V * T
    if method == "curvlinops_kfac":  # dense factors of every covered nn.Linear
        total = 0
        for module in built.model.modules():
            if isinstance(module, nn.Linear):
                d_out, d_in = module.weight.shape
                total += 4 * (d_out * d_out + d_in * d_in)
        return total
    return None


def _vectors(built: Built) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(2)
    return {n: torch.randn(p.shape, generator=g) for n, p in built.model.named_parameters()}


class Runner:
    """The candidates' work on one built model and its trace."""

    def __init__(self, built: Built, cg=None, trace: bool = True):
        self.built = built
        self.cg = cg if cg is not None or not trace else built.trace()
        self.vectors = _vectors(built)
        self._prepared: Dict[str, Any] = {}

    # curvgraph
    def gradient(self, _=None):
        b = self.built
        b.model.zero_grad(set_to_none=True)
        b.loss(b.logits(b.ids)).backward()

    def forward_backward(self, _=None):
        b = self.built
        b.model.zero_grad(set_to_none=True)
        out = b.traced_logits(self.cg)
        loss = b.loss(out)
        loss.backward()  # a training step's order: the curvature after backward()
        return loss, out

    def gradient_traced(self, _=None):
        b = self.built
        b.model.zero_grad(set_to_none=True)
        b.loss(b.traced_logits(self.cg)).backward()

    def curvature(self, method: str, prepared):
        loss, out = prepared
        retained = method.endswith("_retained")
        method = method.removesuffix("_retained")
        options = KFAC_OPTIONS if method == "kfac" else {}
        if method == "diag":
            options = dict(mc_samples=1)
        if method != "exact":  # a training step's call: the record is freed as it is walked
            options = {**options, "retain_record": retained}
        return self.cg.curvature(loss, out, "ggn", method=method, **options)

    def total(self, method: str):
        return self.curvature(method, self.forward_backward())

    def exact_prepared(self):
        if "exact" not in self._prepared:
            self._prepared["exact"] = self.curvature("exact", self.forward_backward())
        return self._prepared["exact"]

    def product(self, curv):
        return curv.matvec(self.vectors)

    # curvlinops
    def curvlinops_operator(self, kind: str):
        import curvlinops

        b = self.built
        data = [(b.ids, b.targets)]
        loss = nn.CrossEntropyLoss()
        if kind == "kfac":
            params, _ = curvlinops_params(b)
            op = curvlinops.KFACLinearOperator(
                b.curvlinops_model(),
                loss,
                params,
                data,
                check_deterministic=False,
                fisher_type="mc",
                mc_samples=1,
                kfac_approx="expand",
            )
            op.compute_kronecker_factors()
            return op
        params = [p for p in b.model.parameters() if p.requires_grad]
        cls = curvlinops.GGNLinearOperator if kind == "ggn" else curvlinops.HessianLinearOperator
        return cls(b.curvlinops_model(), loss, params, data, check_deterministic=False)

    def curvlinops_prepared(self, kind: str):
        if kind not in self._prepared:
            op = self.curvlinops_operator(kind)
            flat = torch.cat([v.flatten() for v in self.vectors.values()])
            self._prepared[kind] = (op, flat)
        return self._prepared[kind]

    def release(self) -> None:
        self._prepared.clear()


Plan = Dict[str, Tuple[Callable, Optional[Callable[[], Any]]]]


def timing_plan(runner: Runner, keys: List[str]) -> Plan:
    """``key -> (fn, setup)`` of the candidates ``keys`` (see :data:`CANDIDATES`)."""
    r = runner
    table: Plan = {
        "gradient": (r.gradient, None),
        "gradient (traced)": (r.gradient_traced, None),
        "kfac pass": (lambda p: r.curvature("kfac", p), r.forward_backward),
        "kfac total": (lambda: r.total("kfac"), None),
        "kfac pass (record retained)": (
            lambda p: r.curvature("kfac_retained", p),
            r.forward_backward,
        ),
        "diag pass": (lambda p: r.curvature("diag", p), r.forward_backward),
        "kflr pass": (lambda p: r.curvature("kflr", p), r.forward_backward),
        "exact preparation": (lambda p: r.curvature("exact", p), r.forward_backward),
        "exact product": (r.product, r.exact_prepared),
        "curvlinops KFAC": (lambda: r.curvlinops_operator("kfac"), None),
        "curvlinops GGN product": (lambda p: p[0] @ p[1], lambda: r.curvlinops_prepared("ggn")),
        "curvlinops Hessian product": (
            lambda p: p[0] @ p[1],
            lambda: r.curvlinops_prepared("hessian"),
        ),
    }
    return {k: table[k] for k in keys}


def memory_work(
    runner: Runner, method: str, product: bool = True
) -> Callable[[], Dict[str, float]]:
    """The whole work of ``method`` (forward and backward included), timed by stages.

    ``product=False``: ``exact`` without its product (the preparation only).
    """
    import time

    r = runner

    def stages(*steps: Tuple[str, Callable]) -> Callable[[], Dict[str, float]]:
        def run() -> Dict[str, float]:
            times: Dict[str, float] = {}
            value: Any = None
            for name, step in steps:
                start = time.perf_counter()
                value = step(value)
                times[name] = time.perf_counter() - start
            return times

        return run

    if method == "gradient":
        return stages(("gradient", r.gradient))
    if method == "gradient_traced":
        return stages(("gradient (traced)", r.gradient_traced))
    fwd_bwd = ("forward + backward (traced)", r.forward_backward)
    if method in ("kfac", "diag", "kflr", "kfac_retained"):
        return stages(fwd_bwd, (f"{method} pass", lambda p, m=method: r.curvature(m, p)))
    if method == "exact":
        prepare = ("exact preparation", lambda p: r.curvature("exact", p))
        if not product:
            return stages(fwd_bwd, prepare)
        return stages(fwd_bwd, prepare, ("exact product", r.product))
    if method == "curvlinops_kfac":
        return stages(("curvlinops KFAC", lambda _: r.curvlinops_operator("kfac")))
    kind = method.split("_")[1]
    label = f"curvlinops {'GGN' if kind == 'ggn' else 'Hessian'} product"
    flat = torch.cat([v.flatten() for v in r.vectors.values()])
    return stages(
        ("construction", lambda _: r.curvlinops_operator(kind)),
        (label, lambda op: op @ flat),
    )
