"""Newton directions of one parameter group: exact eig solves, lockstep CG for the rest.

Every block solves ``[(1 - alpha) C + alpha I] d = -g``. ``solver="auto"`` solves the
Kronecker blocks exactly through their factors' eigendecompositions; ``solver="eig"`` solves
every block it can decompose exactly (:func:`curvgraph.solvers.kronecker.block_eigen`:
Kronecker blocks through their factors, diagonal, low-rank and dense blocks, and small
blocks known by products, through their own eigenpairs). The eigendecompositions are cached
in the optimizer state and recomputed every ``update_every`` steps. All other blocks go
through one lockstep (preconditioned, warm-started) CG loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, KroneckerBlock
from curvgraph.solvers import (
    cg,
    diagonal_preconditioner,
    kronecker_eigen_solve,
    kronecker_preconditioner,
)
from curvgraph.solvers.kronecker import (
    block_eigen,
    eigen_matches,
    has_negative_eigenvalues,
    inverse_eigenvalues,
    solves_directly,
)

__all__ = ["GroupSolution", "solve_group", "eig_names", "BACKTRACKING_GROWTH"]

#: CG-backtracking keeps the iterates ``ceil(BACKTRACKING_GROWTH^j)`` (Martens 2010, 4.6)
BACKTRACKING_GROWTH = 1.3


@dataclass
class GroupSolution:
    """What :func:`solve_group` returns.

    Attributes:
        directions: name -> ``d`` (the final CG iterate or the exact eig solution).
        candidates: for CG-backtracking, name -> ``d`` at a growing sequence of CG
            iterations (the last equals ``directions``); otherwise ``[directions]``.
        iterations / residuals / nonpositive: name -> 0-dim tensors (CG iterations, final
            residual norm, whether non-positive curvature was met).
        solver: name -> ``"cg"`` or ``"eig"``.
    """

    directions: Dict[str, Tensor]
    candidates: List[Dict[str, Tensor]] = field(default_factory=list)
    iterations: Dict[str, Tensor] = field(default_factory=dict)
    residuals: Dict[str, Tensor] = field(default_factory=dict)
    nonpositive: Dict[str, Tensor] = field(default_factory=dict)
    solver: Dict[str, str] = field(default_factory=dict)


def eig_names(group: dict, params: Dict[str, Tensor], curvature: BlockCurvature) -> List[str]:
    """The blocks of ``params`` that the group solves exactly (the others go through CG).

    ``"cg"``: none; ``"auto"``: the Kronecker blocks; ``"eig"``: every block that
    :func:`~curvgraph.solvers.kronecker.block_eigen` decomposes (all but large blocks known
    only by their products), so a kflr curvature's weights are solved through their
    Kronecker factors and its biases (low-rank blocks) through their own eigenpairs.
    """
    solver = group["solver"]
    if solver == "cg":
        return []
    if solver == "auto":
        return [n for n in params if isinstance(curvature[n], KroneckerBlock)]
    return [n for n in params if solves_directly(curvature[n])]


def _cached_eigen(state: dict, block, update_every: int):
    """The block's eigendecomposition, recomputed when ``update_every`` steps old.

    Kept as ``kron_eigen`` for a Kronecker block, ``block_eigen`` for any other.
    """
    key = "kron_eigen" if isinstance(block, KroneckerBlock) else "block_eigen"
    eigen, age = state.get(key), state.get(f"{key}_age", 0)
    if eigen is None or age >= update_every or not eigen_matches(eigen, block):
        eigen, age = block_eigen(block), 0
    state[key], state[f"{key}_age"] = eigen, age + 1
    return eigen


def _cached_spectrum(spectra: Optional[dict], param: Tensor, eigen: dict, alpha: float):
    """``(inverse_eigenvalues(eigen, alpha), has_negative_eigenvalues(eigen))``, cached.

    The entry of ``param`` in ``spectra`` holds while its eigendecomposition is the same
    object (``update_every`` steps, or a reused curvature) and ``alpha`` the same value, so a
    step with a cached decomposition spends no operations on the spectrum.
    """
    if spectra is None:
        return inverse_eigenvalues(eigen, alpha), has_negative_eigenvalues(eigen)
    key = eigen["first_values"]
    cached = spectra.get(param)
    if cached is None or cached[0] is not key:
        cached = spectra[param] = (key, has_negative_eigenvalues(eigen), {})
    inverses = cached[2]
    if alpha not in inverses:
        inverses.clear()  # LM damping moves alpha: keep only the current one
        inverses[alpha] = inverse_eigenvalues(eigen, alpha)
    return inverses[alpha], cached[1]


def solve_group(
    states: dict,
    group: dict,
    params: Dict[str, Tensor],
    curvature: BlockCurvature,
    spectra: Optional[dict] = None,
) -> GroupSolution:
    """Directions for the blocks of ``params`` (name -> parameter with a finite gradient).

    Args:
        states: the optimizer's ``state`` (parameter -> dict); eig caches and warm-start
            directions are read from and written to it.
        group: the parameter group (``alpha``, ``solver``, ``cg_*``, ...).
        params: name -> parameter.
        curvature: the blocks.
        spectra: parameter -> cached damped inverse eigenvalues of the eig blocks (see
            :func:`_cached_spectrum`; not part of the state: rebuilt after a reload).
    """
    alpha = group["alpha"]
    exact = eig_names(group, params, curvature)
    cg_names = [n for n in params if n not in exact]
    solution = GroupSolution(directions={})
    zero = params[next(iter(params))].grad.new_zeros(()) if exact else None
    for name in exact:
        param = params[name]
        eigen = _cached_eigen(states[param], curvature[name], group["update_every"])
        inverse, negative = _cached_spectrum(spectra, param, eigen, alpha)
        rhs = param.grad.unsqueeze(0)
        solution.directions[name] = -kronecker_eigen_solve(eigen, rhs, alpha, inverse)[0]
        solution.iterations[name] = torch.zeros((), dtype=torch.long, device=zero.device)
        solution.residuals[name] = zero
        solution.nonpositive[name] = negative
        solution.solver[name] = "eig"
    if not cg_names:
        solution.candidates = [dict(solution.directions)]
        return solution
    _solve_cg(states, group, {n: params[n] for n in cg_names}, curvature, solution)
    return solution


def _solve_cg(states, group, params, curvature, solution: GroupSolution) -> None:
    alpha, names = group["alpha"], list(params)
    weight = alpha
    if group.get("compile", False):  # torch.compile guards a float's value: one graph per alpha
        first = next(iter(params.values()))
        weight = torch.tensor(alpha, dtype=first.dtype, device=first.device)

    def damped(vectors):
        products = curvature.matvec(vectors)
        return {n: (1 - weight) * products[n] + weight * v for n, v in vectors.items()}

    preconditioner = None
    if group["preconditioner"] == "diagonal":
        preconditioner = diagonal_preconditioner(curvature, alpha, names)
    elif group["preconditioner"] == "kronecker":
        preconditioner = kronecker_preconditioner(curvature, alpha, names)
    x0 = None
    if group["warm_start"] > 0:
        previous = {n: states[p].get("cg_direction") for n, p in params.items()}
        if any(v is not None for v in previous.values()):
            x0 = {
                n: (
                    torch.zeros_like(p)
                    if previous[n] is None
                    else group["warm_start"] * previous[n]
                )
                for n, p in params.items()
            }
    kept, callback = [], None
    if group["backtracking"]:
        schedule = {math.ceil(BACKTRACKING_GROWTH**j) for j in range(200)}

        def callback(k, x):
            if k in schedule:
                kept.append((k, {n: v.clone() for n, v in x.items()}))

    directions, info = cg(
        damped,
        {n: -p.grad for n, p in params.items()},
        x0,
        tol=group["cg_tol"],
        atol=group["cg_atol"],
        maxiter=group["cg_maxiter"],
        M=preconditioner,
        callback=callback,
        compile=group.get("compile", False),
    )
    if group["warm_start"] > 0:
        for n, p in params.items():
            states[p]["cg_direction"] = directions[n].clone()
    fixed = dict(solution.directions)
    solution.directions.update(directions)
    last = int(info.iterations.max()) if kept else 0
    earlier = [{**fixed, **x} for k, x in kept if k < last]
    solution.candidates = earlier + [dict(solution.directions)]
    for i, n in enumerate(names):
        solution.iterations[n] = info.iterations[i]
        solution.residuals[n] = info.residual_norm[i]
        solution.nonpositive[n] = info.nonpositive_curvature[i]
        solution.solver[n] = "cg"
