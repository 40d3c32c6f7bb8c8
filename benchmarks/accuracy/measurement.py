"""Measuring one problem instance: exact reference blocks, approximations, their errors.

:class:`Instance` builds the model and the batch, runs the curvgraph pass and computes the
dense references (``torch.func`` Hessian and ``J^T H J``, curvgraph ``method="exact"``)
and the peers' blocks (BackPACK, curvlinops; :class:`NotApplicable` with the reason when
a peer cannot run). :func:`_compute` maps a method key to its dense blocks,
:func:`_errors` gives the relative errors ``||C_approx,b - C_exact,b||_F /
||C_exact,b||_F`` and their aggregates, and :func:`evaluate` does both for every method.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import statistics
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import curvgraph
from benchmarks.accuracy.config import (
    DTYPE,
    M_LARGE,
    METHODS,
    Problem,
    batch,
    loss_function,
    loss_module,
)


def peer_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the peers: ``{"backpack": ..., "curvlinops": ...}``, None if absent."""
    versions = {}
    for key, dist in (
        ("backpack", "backpack-for-pytorch"),
        ("curvlinops", "curvlinops-for-pytorch"),
    ):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = None
    return versions


class NotApplicable(Exception):
    """A method that cannot run on a problem (the message says why)."""


def _reason(error: BaseException) -> str:
    """``Type: message (in file:line function)``, the place being the deepest peer frame."""
    message = str(error).strip() or "(no message)"
    frames = traceback.extract_tb(error.__traceback__)
    peer = [f for f in frames if re.search(r"[/\\](backpack|curvlinops)[/\\]", f.filename)]
    where = (peer or frames or [None])[-1]
    if where is not None:
        name = where.filename.replace("\\", "/")
        name = name.split("site-packages/")[-1] if "site-packages/" in name else Path(name).name
        message += f" (in {name}:{where.lineno} {where.name})"
    return f"{type(error).__name__}: {message}"


# -- one problem instance: the exact blocks and the approximations ---------------------------


class Instance:
    """One problem at one batch size and seed: model, data, curvgraph pass, references."""

    def __init__(self, name: str, problem: Problem, n: int, seed: int, device: str):
        self.name, self.problem, self.n, self.seed, self.device = name, problem, n, seed, device
        torch.manual_seed(seed)
        self.model = problem.build().to(device=device, dtype=DTYPE)
        self.x, self.y = batch(problem, n, seed, device)
        self.params = dict(self.model.named_parameters())
        self.cg = curvgraph.trace(self.model)
        self.out = self.cg(self.x)
        self.loss = loss_function(problem)(self.out, self.y)
        self.loss.backward()
        self.notes: Dict[str, str] = {}

    def linear_blocks(self) -> List[str]:
        """Names of the parameters of ``nn.Linear`` layers."""
        return [
            f"{m}.{p}" if m else p
            for m, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
            for p, _ in module.named_parameters(recurse=False)
        ]

    def curvgraph(self, curvature: str, method: str, **options) -> Dict[str, Tensor]:
        """Dense blocks of curvgraph's ``curvature`` by ``method`` (``options`` passed on)."""
        curv = self.cg.curvature(self.loss, self.out, curvature=curvature, method=method, **options)
        return {name: curv[name].to_dense() for name in self.params}

    # references

    def _functional(self, name: str) -> Callable[[Tensor], Tensor]:
        others = {k: v.detach() for k, v in self.params.items()}

        def forward(p: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, {**others, name: p}, (self.x,))

        return forward

    def func_hessian(self) -> Dict[str, Tensor]:
        """Exact Hessian blocks with ``torch.func.hessian``."""
        blocks = {}
        loss_fn = loss_function(self.problem)
        for name, p in self.params.items():
            forward = self._functional(name)
            h = torch.func.hessian(lambda q, f=forward: loss_fn(f(q), self.y))(p.detach())
            blocks[name] = h.reshape(p.numel(), p.numel())
        return blocks

    def func_ggn(self) -> Dict[str, Tensor]:
        """Exact GGN blocks ``J^T (d2L/dz2) J`` with ``torch.func`` (independent of curvgraph)."""
        loss_fn = loss_function(self.problem)
        out = self.out.detach()
        h_out = torch.func.hessian(lambda z: loss_fn(z.reshape(out.shape), self.y))(out.flatten())
        h_out = h_out.reshape(out.numel(), out.numel())
        blocks = {}
        for name, p in self.params.items():
            jac = torch.func.jacrev(self._functional(name))(p.detach())
            jac = jac.reshape(out.numel(), p.numel())
            blocks[name] = jac.T @ h_out @ jac
        return blocks

    # peers

    def backpack(self, extension_name: str, **kwargs) -> Dict[str, Tensor]:
        """Dense blocks of BackPACK's extension ``extension_name`` (Kronecker or diagonal).

        Raises:
            NotApplicable: BackPACK is missing or cannot handle the model (the reason).
        """
        try:
            import backpack
            from backpack import extensions
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise NotApplicable(f"BackPACK not installed ({error})") from error
        extension = getattr(extensions, extension_name)(**kwargs)

        def attempt(use_converter: bool) -> nn.Module:
            model = backpack.extend(copy.deepcopy(self.model), use_converter=use_converter)
            lossfunc = backpack.extend(loss_module(self.problem))
            model.zero_grad()
            with backpack.backpack(extension):
                lossfunc(model(self.x), self.y).backward()
            return model

        try:
            model = attempt(False)
        except Exception as plain:
            if not (isinstance(plain, NotImplementedError) and "for Module" in str(plain)):
                raise NotApplicable(_reason(plain)) from plain
            # a module BackPACK does not know (here: a custom forward with `+`): its converter
            try:
                model = attempt(True)
            except Exception as error:
                raise NotApplicable(
                    f"extend(model): {_reason(plain)}; extend(model, use_converter=True): "
                    f"{_reason(error)}"
                ) from error
            self.notes[f"BackPACK {extension_name}"] = (
                f"extend(model) raised {_reason(plain)}; ran with extend(model, use_converter=True)"
            )
        params = dict(model.named_parameters())
        blocks = {}
        for name, p in self.params.items():
            value = getattr(params[name], extension.savefield)
            if isinstance(value, (list, tuple)):  # Kronecker factors, in row-major vec order
                blocks[name] = functools.reduce(torch.kron, [f.contiguous() for f in value])
            else:  # a diagonal, shaped like the parameter
                blocks[name] = torch.diag(value.flatten())
            blocks[name] = blocks[name].reshape(p.numel(), p.numel())
        return blocks

    def curvlinops(self, **kwargs) -> Dict[str, Tensor]:
        """Diagonal blocks of curvlinops' ``KFACLinearOperator`` applied to the identity.

        Raises:
            NotApplicable: curvlinops is missing or cannot handle the model (the reason).
        """
        try:
            import curvlinops
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise NotApplicable(f"curvlinops not installed ({error})") from error
        params = list(self.params.values())
        try:
            op = curvlinops.KFACLinearOperator(
                self.model,
                loss_module(self.problem),
                params,
                [(self.x, self.y)],
                check_deterministic=False,
                kfac_approx="expand",
                **kwargs,
            )
            total = sum(p.numel() for p in params)
            dense = op @ torch.eye(total, dtype=DTYPE, device=self.device)
        except Exception as error:
            raise NotApplicable(_reason(error)) from error
        blocks, start = {}, 0
        for name, p in self.params.items():
            stop = start + p.numel()
            blocks[name] = dense[start:stop, start:stop]
            start = stop
        return blocks


def _compute(inst: Instance, key: str, repeat: int) -> Dict[str, Tensor]:
    """Dense blocks of method ``key`` (draw ``repeat`` for Monte-Carlo methods)."""
    mc_seed = 10_000 * inst.seed + 100 * inst.n + repeat
    gen = torch.Generator(device=inst.device).manual_seed(mc_seed)
    method = METHODS[key]
    if key.startswith("hbp-"):
        curvature = method.reference
        average = not key.endswith("-expect")
        return inst.curvgraph(
            curvature, "hbp", average_input_jac=average, average_param_jac=average
        )
    if key == "kflr" or key == "diag" or key == "sqrt":
        return inst.curvgraph("ggn", key)
    if method.library == "curvgraph":  # kfac-M, diag-mc-M, sqrt-mc-M
        base = key.split("-")[0]
        return inst.curvgraph("ggn", base, mc_samples=method.mc_samples, generator=gen)
    if method.library == "backpack":
        extension, kwargs = {
            "backpack-kflr": ("KFLR", {}),
            "backpack-kfra": ("KFRA", {}),
            "backpack-kfac-1": ("KFAC", {"mc_samples": 1}),
            f"backpack-kfac-{M_LARGE}": ("KFAC", {"mc_samples": M_LARGE}),
            "backpack-diag-ggn-exact": ("DiagGGNExact", {}),
            "backpack-diag-ggn-mc-1": ("DiagGGNMC", {"mc_samples": 1}),
        }[key]
        with torch.random.fork_rng(devices=[] if inst.device == "cpu" else None):
            torch.manual_seed(mc_seed)
            return inst.backpack(extension, **kwargs)
    if key == "curvlinops-kfac-type2":
        return inst.curvlinops(fisher_type="type-2")
    if key == "curvlinops-kfac-mc-1":
        return inst.curvlinops(fisher_type="mc", mc_samples=1, seed=mc_seed)
    raise KeyError(key)


def _errors(approx: Dict[str, Tensor], exact: Dict[str, Tensor]) -> Dict[str, Any]:
    """Per-block relative errors (full block and diagonal) and their aggregates."""
    blocks, sums = {}, [0.0, 0.0, 0.0, 0.0]
    for name, ref in exact.items():
        diff = approx[name] - ref
        d_full, r_full = float(diff.square().sum()), float(ref.square().sum())
        d_diag, r_diag = float(diff.diagonal().square().sum()), float(ref.diagonal().square().sum())
        for i, v in enumerate((d_full, r_full, d_diag, r_diag)):
            sums[i] += v
        blocks[name] = {"error": _ratio(d_full, r_full), "error_diag": _ratio(d_diag, r_diag)}
    full = [b["error"] for b in blocks.values()]
    return {
        "blocks": blocks,
        "median": statistics.median(full),
        "max": max(full),
        "blockdiag": _ratio(sums[0], sums[1]),
        "blockdiag_diag": _ratio(sums[2], sums[3]),
    }


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


def _mean_errors(draws: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean over Monte-Carlo draws (per block and per aggregate); std of the block-diagonal."""
    if len(draws) == 1:
        return {**draws[0], "repeats": 1, "blockdiag_std": 0.0}
    mean = {
        key: statistics.fmean(d[key] for d in draws)
        for key in ("median", "max", "blockdiag", "blockdiag_diag")
    }
    mean["blocks"] = {
        name: {
            key: statistics.fmean(d["blocks"][name][key] for d in draws)
            for key in ("error", "error_diag")
        }
        for name in draws[0]["blocks"]
    }
    mean["repeats"] = len(draws)
    mean["blockdiag_std"] = statistics.stdev(d["blockdiag"] for d in draws)
    return mean


def evaluate(inst: Instance, methods: Sequence[str], mc_repeats: int) -> Dict[str, Any]:
    """References, their cross-checks, and every method's errors for one instance."""
    exact = {
        "hessian": inst.func_hessian(),
        "ggn": inst.curvgraph("ggn", "exact"),
        "pch-abs": inst.curvgraph("pch-abs", "exact"),
        "pch-clip": inst.curvgraph("pch-clip", "exact"),
    }
    checks = {
        "ggn: curvgraph exact vs torch.func J^T H J": _errors(inst.func_ggn(), exact["ggn"])["max"],
        "hessian: curvgraph exact vs torch.func.hessian": _errors(
            inst.curvgraph("hessian", "exact"), exact["hessian"]
        )["max"],
    }
    results = {}
    for key in methods:
        method = METHODS[key]
        repeats = mc_repeats if method.mc_samples else 1
        try:
            draws = [
                _errors(_compute(inst, key, r), exact[method.reference]) for r in range(repeats)
            ]
        except NotApplicable as error:
            results[key] = {"status": "n/a", "reason": str(error)}
            continue
        results[key] = {"status": "ok", **_mean_errors(draws)}
    return {"checks": checks, "methods": results}
