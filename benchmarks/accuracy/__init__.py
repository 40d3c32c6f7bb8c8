"""Accuracy of the curvature approximations against the exact blocks, as a function of N.

For every approximation and every parameter block ``b`` of a small problem, in float64::

    error_b = ||C_approx,b - C_exact,b||_F / ||C_exact,b||_F

aggregated over the blocks as the median, the maximum and the error of the block-diagonal
matrix, ``sqrt(sum_b ||C_approx,b - C_exact,b||^2) / sqrt(sum_b ||C_exact,b||^2)``, for the
batch sizes ``N`` in ``(1, 8, 64)``. Every method also gets the error of its diagonal alone,
``||diag C_approx,b - diag C_exact,b|| / ||diag C_exact,b||`` (the number that matters for the
diagonal methods, whose full-block error is the off-diagonal share of the block).

References (dense blocks, float64):

- ``hessian``: ``torch.func.hessian`` of the loss w.r.t. one parameter (the others fixed);
- ``ggn``: curvgraph ``method="exact"``, checked against ``torch.func``'s ``J^T H J``
  (``jacrev`` of the model output, ``hessian`` of the loss w.r.t. the output); the check is
  reported with the results, as is curvgraph's exact Hessian against ``torch.func``;
- ``pch-abs`` / ``pch-clip``: curvgraph ``method="exact"`` (the residuals modified per sample).

Approximations: curvgraph ``hbp`` (every curvature, with ``average_*_jac`` True = "average"
and False = "expect"; the GGN with "expect" is KFRA), ``kflr``, ``kfac`` (1 and 16 Monte-Carlo
samples), ``diag`` (exact and 1 MC sample), ``sqrt`` (exact factors and 1 / 16 MC samples);
BackPACK ``KFAC``, ``KFLR``, ``KFRA``, ``DiagGGNExact`` and ``DiagGGNMC`` and curvlinops
``KFACLinearOperator`` (type-2 and MC), each when installed. A peer that cannot handle a
problem gets ``n/a`` and the exception it raised. Monte-Carlo errors are the mean over
``mc_repeats`` independent draws.

Data: the bundled MNIST subset (``curvgraph.datasets.load_mnist_subset("train")``), digits
0-4, standardized, centre-cropped and average-pooled to 4x5 = 20 features (MLPs) or 1x8x8
images (CNNs); batch ``n`` of seed ``s`` is the first ``n`` digits of a permutation seeded
with ``s``. Models are built after ``torch.manual_seed(s)``.

Entry points (called by ``python -m benchmarks``): :func:`run`, :func:`markdown`,
:func:`plot`; ``python -m benchmarks.accuracy [--suite quick]`` runs a suite on its own and
prints the Markdown.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import curvgraph
from curvgraph.datasets import load_mnist_subset

__all__ = ["METHODS", "PROBLEMS", "SUITES", "markdown", "plot", "run"]

SCHEMA_VERSION = 1
DTYPE = torch.float64
CLASSES = 5  # digits 0-4
IDENTITY_TOL = 1e-10  # float64 "exact": the N = 1 identities must hold to this
LOG_FLOOR = 1e-17  # plotted in place of errors that are exactly zero

SUITES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(
        problems=("mlp_sigmoid",), batch_sizes=(1, 8), seeds=(0,), mc_repeats=1, peers=True
    ),
    "quick": dict(
        problems=("mlp_sigmoid", "mlp_relu", "cnn", "resmlp"),
        batch_sizes=(1, 8, 64),
        seeds=(0,),
        mc_repeats=5,
        peers=True,
    ),
    "full": dict(
        problems=("mlp_sigmoid", "mlp_relu", "mlp_tanh_mse", "cnn", "cnn_sigmoid", "resmlp"),
        batch_sizes=(1, 8, 64),
        seeds=(0, 1, 2),
        mc_repeats=10,
        peers=True,
    ),
}


# -- problems --------------------------------------------------------------------------------


class ResMLP(nn.Module):
    """``x -> sigmoid(fc1 x) = h -> h + sigmoid(fc2 h) -> fc3``: a skip connection by ``+``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(20, 16), nn.Sigmoid()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.Sigmoid()
        self.fc3 = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.fc1(x))
        h = h + self.act2(self.fc2(h))
        return self.fc3(h)


def _mlp(activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 16), activation(), nn.Linear(16, 16), activation(), nn.Linear(16, CLASSES)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, CLASSES)
    )


def _cnn_sigmoid() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 3),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(36, CLASSES),
    )


@dataclass(frozen=True)
class Problem:
    """A small model, its loss and its inputs (``features``: 20-vectors, ``image``: 1x8x8)."""

    description: str
    build: Callable[[], nn.Module]
    inputs: str
    loss: str  # "ce" (cross-entropy, mean) or "mse" (MSE against one-hot targets, mean)


PROBLEMS: Dict[str, Problem] = {
    "mlp_sigmoid": Problem(
        "MLP 20-16-16-5, sigmoid, cross-entropy",
        functools.partial(_mlp, nn.Sigmoid),
        "features",
        "ce",
    ),
    "mlp_relu": Problem(
        "MLP 20-16-16-5, ReLU, cross-entropy", functools.partial(_mlp, nn.ReLU), "features", "ce"
    ),
    "mlp_tanh_mse": Problem(
        "MLP 20-16-16-5, tanh, MSE on one-hot targets",
        functools.partial(_mlp, nn.Tanh),
        "features",
        "mse",
    ),
    "cnn": Problem(
        "CNN on 1x8x8: conv 4 3x3, ReLU, maxpool 2, linear 36-5, cross-entropy",
        _cnn,
        "image",
        "ce",
    ),
    "cnn_sigmoid": Problem(
        "CNN on 1x8x8: conv 4 3x3 pad 1, sigmoid, conv 4 3x3, sigmoid, avgpool 2, linear 36-5, "
        "cross-entropy",
        _cnn_sigmoid,
        "image",
        "ce",
    ),
    "resmlp": Problem(
        "residual MLP 20-16-(16 + skip)-5, sigmoid, `h + sigmoid(fc2(h))`, cross-entropy",
        ResMLP,
        "features",
        "ce",
    ),
}

DATA_DESCRIPTION = (
    "real data: the bundled MNIST subset (training split), digits 0-4, standardized with the "
    "MNIST mean/std, centre-cropped and average-pooled: 24x20 crop -> 6x4 pooling -> 20 "
    "features (MLPs), 24x24 crop -> 3x3 pooling -> 1x8x8 (CNNs); batch of seed s = first N "
    "digits of a permutation seeded with s; models initialized with torch.manual_seed(s)"
)


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[Tensor, Tensor]:
    """Standardized MNIST training digits 0-4 ``[n, 1, 28, 28]`` (float64) and labels."""
    images, labels = load_mnist_subset("train", normalize=True).tensors
    keep = labels < CLASSES
    return images[keep].to(DTYPE), labels[keep]


def batch(problem: Problem, n: int, seed: int, device: str) -> Tuple[Tensor, Tensor]:
    """Inputs and targets: ``n`` digits chosen by ``seed``, shaped for ``problem``."""
    images, labels = _digits()
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=g)[:n]
    images, labels = images[index], labels[index]
    if problem.inputs == "features":
        x = F.avg_pool2d(images[:, :, 2:26, 4:24], (6, 4)).flatten(1)  # [n, 20]
    else:
        x = F.avg_pool2d(images[:, :, 2:26, 2:26], 3)  # [n, 1, 8, 8]
    y = labels if problem.loss == "ce" else F.one_hot(labels, CLASSES).to(DTYPE)
    return x.to(device), y.to(device)


def _loss_fn(problem: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if problem.loss == "ce" else F.mse_loss


def _loss_module(problem: Problem) -> nn.Module:
    return nn.CrossEntropyLoss() if problem.loss == "ce" else nn.MSELoss()


# -- methods ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """An approximation: who computes it, what it approximates, and how."""

    label: str
    library: str  # "curvgraph" | "backpack" | "curvlinops"
    reference: str  # "hessian" | "ggn" | "pch-abs" | "pch-clip"
    kind: str  # "block" (dense/Kronecker/low-rank) or "diagonal"
    mc_samples: int  # 0: deterministic
    note: str


M_LARGE = 16  # "a larger M" for the Monte-Carlo methods

METHODS: Dict[str, Method] = {
    "hbp-hessian": Method(
        "hbp hessian (average)", "curvgraph", "hessian", "block", 0, "average_*_jac=True"
    ),
    "hbp-hessian-expect": Method(
        "hbp hessian (expect)", "curvgraph", "hessian", "block", 0, "average_*_jac=False"
    ),
    "hbp-ggn": Method("hbp ggn (average)", "curvgraph", "ggn", "block", 0, "average_*_jac=True"),
    "hbp-ggn-expect": Method(
        "hbp ggn (expect) = KFRA", "curvgraph", "ggn", "block", 0, "average_*_jac=False"
    ),
    "hbp-pch-abs": Method("hbp pch-abs (average)", "curvgraph", "pch-abs", "block", 0, ""),
    "hbp-pch-clip": Method("hbp pch-clip (average)", "curvgraph", "pch-clip", "block", 0, ""),
    "kflr": Method("kflr", "curvgraph", "ggn", "block", 0, "exact loss-Hessian factors"),
    "kfac-1": Method("kfac M=1", "curvgraph", "ggn", "block", 1, "mc_samples=1"),
    f"kfac-{M_LARGE}": Method(
        f"kfac M={M_LARGE}", "curvgraph", "ggn", "block", M_LARGE, f"mc_samples={M_LARGE}"
    ),
    "diag": Method("diag (exact)", "curvgraph", "ggn", "diagonal", 0, "mc_samples=0"),
    "diag-mc-1": Method("diag MC M=1", "curvgraph", "ggn", "diagonal", 1, "mc_samples=1"),
    "sqrt": Method("sqrt (exact factors)", "curvgraph", "ggn", "block", 0, "the exact GGN"),
    "sqrt-mc-1": Method("sqrt MC M=1", "curvgraph", "ggn", "block", 1, "MC GGN, mc_samples=1"),
    f"sqrt-mc-{M_LARGE}": Method(
        f"sqrt MC M={M_LARGE}", "curvgraph", "ggn", "block", M_LARGE, f"MC GGN, M={M_LARGE}"
    ),
    "backpack-kflr": Method("BackPACK KFLR", "backpack", "ggn", "block", 0, "kron(*param.kflr)"),
    "backpack-kfra": Method("BackPACK KFRA", "backpack", "ggn", "block", 0, "kron(*param.kfra)"),
    "backpack-kfac-1": Method(
        "BackPACK KFAC M=1", "backpack", "ggn", "block", 1, "kron(*param.kfac), mc_samples=1"
    ),
    f"backpack-kfac-{M_LARGE}": Method(
        f"BackPACK KFAC M={M_LARGE}", "backpack", "ggn", "block", M_LARGE, f"mc_samples={M_LARGE}"
    ),
    "backpack-diag-ggn-exact": Method(
        "BackPACK DiagGGNExact", "backpack", "ggn", "diagonal", 0, "param.diag_ggn_exact"
    ),
    "backpack-diag-ggn-mc-1": Method(
        "BackPACK DiagGGNMC M=1", "backpack", "ggn", "diagonal", 1, "param.diag_ggn_mc"
    ),
    "curvlinops-kfac-type2": Method(
        "curvlinops KFAC type-2",
        "curvlinops",
        "ggn",
        "block",
        0,
        'KFACLinearOperator(fisher_type="type-2", kfac_approx="expand")',
    ),
    "curvlinops-kfac-mc-1": Method(
        "curvlinops KFAC MC M=1",
        "curvlinops",
        "ggn",
        "block",
        1,
        'KFACLinearOperator(fisher_type="mc", mc_samples=1, kfac_approx="expand")',
    ),
}

#: methods of one family share a colour in the plot (the same approximation, other library)
FAMILY = {
    "backpack-kflr": "kflr",
    "curvlinops-kfac-type2": "kflr",
    "backpack-kfra": "hbp-ggn-expect",
    "backpack-kfac-1": "kfac-1",
    "curvlinops-kfac-mc-1": "kfac-1",
    f"backpack-kfac-{M_LARGE}": f"kfac-{M_LARGE}",
    "backpack-diag-ggn-exact": "diag",
    "backpack-diag-ggn-mc-1": "diag-mc-1",
}

#: methods that equal the exact block at N = 1 on linear layers (the identity the table shows)
N1_EXACT_ON_LINEAR = (
    "hbp-hessian",
    "hbp-hessian-expect",
    "hbp-ggn",
    "hbp-ggn-expect",
    "hbp-pch-abs",
    "hbp-pch-clip",
    "kflr",
    "sqrt",
    "backpack-kflr",
    "backpack-kfra",
    "curvlinops-kfac-type2",
)

REFERENCES = {
    "hessian": "torch.func.hessian of the loss w.r.t. the parameter",
    "ggn": 'curvgraph method="exact", curvature="ggn" (checked against torch.func J^T H J)',
    "pch-abs": 'curvgraph method="exact", curvature="pch-abs" (residuals modified per sample)',
    "pch-clip": 'curvgraph method="exact", curvature="pch-clip" (residuals modified per sample)',
}


def _peer_versions() -> Dict[str, Optional[str]]:
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
        self.loss = _loss_fn(problem)(self.out, self.y)
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
        loss_fn = _loss_fn(self.problem)
        for name, p in self.params.items():
            forward = self._functional(name)
            h = torch.func.hessian(lambda q, f=forward: loss_fn(f(q), self.y))(p.detach())
            blocks[name] = h.reshape(p.numel(), p.numel())
        return blocks

    def func_ggn(self) -> Dict[str, Tensor]:
        """Exact GGN blocks ``J^T (d2L/dz2) J`` with ``torch.func`` (independent of curvgraph)."""
        loss_fn = _loss_fn(self.problem)
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
        try:
            import backpack
            from backpack import extensions
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise NotApplicable(f"BackPACK not installed ({error})") from error
        extension = getattr(extensions, extension_name)(**kwargs)

        def attempt(use_converter: bool) -> nn.Module:
            model = backpack.extend(copy.deepcopy(self.model), use_converter=use_converter)
            lossfunc = backpack.extend(_loss_module(self.problem))
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
        try:
            import curvlinops
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise NotApplicable(f"curvlinops not installed ({error})") from error
        params = list(self.params.values())
        try:
            op = curvlinops.KFACLinearOperator(
                self.model,
                _loss_module(self.problem),
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


def _evaluate(inst: Instance, methods: Sequence[str], mc_repeats: int) -> Dict[str, Any]:
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


# -- the suite -------------------------------------------------------------------------------


def _methods_for(with_peers: bool) -> List[str]:
    return [k for k, m in METHODS.items() if with_peers or m.library == "curvgraph"]


def _run_tasks(
    tasks: List[Tuple[str, int, int]],
    methods: List[str],
    mc_repeats: int,
    device: str,
    progress: bool,
) -> List[Dict[str, Any]]:
    records = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Bb]ackward hook.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*converter.*")
        for name, n, seed in tqdm(tasks, desc="accuracy", disable=not progress):
            inst = Instance(name, PROBLEMS[name], n, seed, device)
            record = _evaluate(inst, methods, mc_repeats)
            record.update(
                problem=name,
                batch_size=n,
                seed=seed,
                linear_blocks=inst.linear_blocks(),
                notes=inst.notes,
            )
            records.append(record)
    return records


def run(suite: str, device: str, progress: bool) -> Dict[str, Any]:
    """Run the accuracy benchmark; returns a JSON-serializable dict (see ``markdown``).

    Args:
        suite: ``"smoke"`` (seconds, for tests), ``"quick"`` (about a minute on 2 CPU cores)
            or ``"full"`` (more problems, three seeds, more Monte-Carlo draws).
        device: ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm progress bar.

    Returns:
        ``config``, ``problems``, ``methods``, ``references``, ``peers`` (versions, ``None``
        when not installed), ``records`` (one per problem, N, seed: per-method errors or
        ``n/a`` with the reason, and the reference cross-checks), ``summary`` (problem ->
        method -> N -> aggregates, averaged over seeds), ``identities`` (N = 1 errors on the
        linear layers) and ``elapsed_s``.
    """
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}; expected one of {sorted(SUITES)}")
    config = SUITES[suite]
    peers = _peer_versions()
    methods = _methods_for(config["peers"])
    tasks = [
        (name, n, seed)
        for name in config["problems"]
        for n in config["batch_sizes"]
        for seed in config["seeds"]
    ]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if device == "cpu":  # tiny kernels: one thread is faster and robust to busy machines
        torch.set_num_threads(1)
    try:
        records = _run_tasks(tasks, methods, config["mc_repeats"], device, progress)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    problems = {}
    for name in config["problems"]:
        torch.manual_seed(0)
        model = PROBLEMS[name].build()
        problems[name] = {
            "description": PROBLEMS[name].description,
            "loss": {"ce": "cross_entropy (mean)", "mse": "mse_loss (mean)"}[PROBLEMS[name].loss],
            "model": str(model),
            "parameters": {k: p.numel() for k, p in model.named_parameters()},
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "accuracy",
        "suite": suite,
        "device": device,
        "dtype": "float64",
        "threads": 1 if device == "cpu" else threads,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "data": DATA_DESCRIPTION,
        "error_definition": (
            "||C_approx - C_exact||_F / ||C_exact||_F per parameter block; aggregates: median "
            "and max over blocks, and blockdiag = error of the block-diagonal matrix "
            "(sqrt of summed squared differences / sqrt of summed squared references); "
            "*_diag: the same on the diagonals only; Monte-Carlo methods: mean over "
            "mc_repeats draws, seeds: mean over seeds"
        ),
        "peers": peers,
        "references": REFERENCES,
        "methods": {
            key: {
                "label": m.label,
                "library": m.library,
                "reference": m.reference,
                "kind": m.kind,
                "mc_samples": m.mc_samples,
                "note": m.note,
                "family": FAMILY.get(key, key),
            }
            for key, m in METHODS.items()
            if key in methods
        },
        "problems": problems,
        "records": records,
        "summary": _summary(records),
        "identities": _identities(records),
        "elapsed_s": elapsed,
    }


def _summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Problem -> method -> str(N) -> aggregates (mean over seeds) or ``n/a`` with reason."""
    grouped: Dict[str, Dict[str, Dict[str, List[Dict[str, Any]]]]] = {}
    for rec in records:
        for key, res in rec["methods"].items():
            grouped.setdefault(rec["problem"], {}).setdefault(key, {}).setdefault(
                str(rec["batch_size"]), []
            ).append(res)
    summary: Dict[str, Any] = {}
    for problem, by_method in grouped.items():
        for key, by_n in by_method.items():
            for n, results in by_n.items():
                ok = [r for r in results if r["status"] == "ok"]
                if not ok:
                    entry = {"status": "n/a", "reason": results[0]["reason"]}
                else:
                    entry = {"status": "ok", "seeds": len(ok)}
                    for agg in ("median", "max", "blockdiag", "blockdiag_diag"):
                        entry[agg] = statistics.fmean(r[agg] for r in ok)
                    entry["blocks"] = {
                        b: {
                            k: statistics.fmean(r["blocks"][b][k] for r in ok)
                            for k in ("error", "error_diag")
                        }
                        for b in ok[0]["blocks"]
                    }
                summary.setdefault(problem, {}).setdefault(key, {})[n] = entry
    return summary


def _identities(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """At N = 1: the largest error over the linear layers' blocks of each exact-at-N=1 method."""
    rows = []
    for rec in records:
        if rec["batch_size"] != 1:
            continue
        for key in N1_EXACT_ON_LINEAR:
            res = rec["methods"].get(key)
            if res is None or res["status"] != "ok":
                continue
            errors = [res["blocks"][b]["error"] for b in rec["linear_blocks"]]
            worst = max(errors)
            rows.append(
                {
                    "problem": rec["problem"],
                    "seed": rec["seed"],
                    "method": key,
                    "blocks": list(rec["linear_blocks"]),
                    "max_error": worst,
                    "holds": worst < IDENTITY_TOL,
                }
            )
    return rows


# -- report ----------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1e}"


def _rows(result: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """``(method key, row label, aggregate prefix)``: diagonal methods get a second row."""
    rows = []
    for key, method in result["methods"].items():
        if method["kind"] == "diagonal":
            rows.append((key, f"{method['label']} — full block", ""))
            rows.append((key, f"{method['label']} — diagonal only", "_diag"))
        else:
            rows.append((key, method["label"], ""))
    return rows


def markdown(result: Dict[str, Any]) -> str:
    """The accuracy section of the report (``##`` heading, tables per problem)."""
    ns = [str(n) for n in result["config"]["batch_sizes"]]
    seeds = result["config"]["seeds"]
    peers = ", ".join(
        f"{k} {v}" if v else f"{k} not installed (its rows: n/a)"
        for k, v in result["peers"].items()
    )
    lines = [
        "## Accuracy of the approximations against the exact blocks",
        "",
        f"Suite `{result['suite']}`, device `{result['device']}`, float64, "
        f"{result['elapsed_s']:.1f} s. Relative error "
        "`||C_approx - C_exact||_F / ||C_exact||_F` per parameter block; "
        "**block-diag** is the error of the whole block-diagonal matrix (squared differences "
        "and squared references summed over the blocks). Monte-Carlo rows are the mean over "
        f"{result['config']['mc_repeats']} draw(s); seeds {seeds} "
        "(errors averaged over seeds). Peers: " + peers + ".",
        "",
        f"Data: {result['data']}.",
        "",
        "References: " + "; ".join(f"`{k}`: {v}" for k, v in result["references"].items()) + ".",
        "",
        "### Reference cross-checks (largest block error over N and seeds)",
        "",
        "| problem | " + " | ".join(result["records"][0]["checks"]) + " |",
        "|---|" + "---:|" * len(result["records"][0]["checks"]),
    ]
    for problem in result["problems"]:
        recs = [r for r in result["records"] if r["problem"] == problem]
        cells = [_fmt(max(r["checks"][c] for r in recs)) for c in recs[0]["checks"]]
        lines.append(f"| {problem} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "### Identity at N = 1 on linear layers (largest error over their weight and bias blocks)",
        "",
        "These methods are exact for one sample on `nn.Linear` layers "
        f"(✓: below {IDENTITY_TOL:g}).",
        "",
        "| method | " + " | ".join(result["problems"]) + " |",
        "|---|" + "---:|" * len(result["problems"]),
    ]
    for key in N1_EXACT_ON_LINEAR:
        if key not in result["methods"]:
            continue
        cells = []
        for problem in result["problems"]:
            rows = [
                r for r in result["identities"] if r["problem"] == problem and r["method"] == key
            ]
            if rows:
                worst = max(r["max_error"] for r in rows)
                cells.append(f"{_fmt(worst)} {'✓' if worst < IDENTITY_TOL else '✗'}")
            else:
                cells.append("n/a")
        lines.append(f"| {result['methods'][key]['label']} | " + " | ".join(cells) + " |")

    for problem, info in result["problems"].items():
        summary = result["summary"].get(problem, {})
        reasons: Dict[str, str] = {}
        lines += [
            "",
            f"### {problem}: {info['description']}",
            "",
            "Block-diagonal error, and median / max over the "
            f"{len(info['parameters'])} blocks ({', '.join(info['parameters'])}).",
            "",
            "| method | reference | "
            + " | ".join(f"N={n} block-diag" for n in ns)
            + " | "
            + " | ".join(f"N={n} median / max" for n in ns)
            + " |",
            "|---|---|" + "---:|" * (2 * len(ns)),
        ]
        for key, label, suffix in _rows(result):
            entries = summary.get(key, {})
            reference = result["methods"][key]["reference"]
            bd, mm = [], []
            for n in ns:
                e = entries.get(n)
                if e is None or e["status"] != "ok":
                    if e is not None:
                        reasons[key] = e["reason"]
                    bd.append("n/a")
                    mm.append("n/a")
                elif suffix:
                    bd.append(_fmt(e["blockdiag_diag"]))
                    mm.append("-")
                else:
                    bd.append(_fmt(e["blockdiag"]))
                    mm.append(f"{_fmt(e['median'])} / {_fmt(e['max'])}")
            lines.append(f"| {label} | {reference} | " + " | ".join(bd + mm) + " |")
        if reasons:
            lines += ["", "n/a:"]
            lines += [f"- {result['methods'][k]['label']}: `{r}`" for k, r in reasons.items()]
        notes = {
            k: v
            for rec in result["records"]
            if rec["problem"] == problem
            for k, v in rec.get("notes", {}).items()
        }
        if notes:
            lines += ["", "Notes:"] + [f"- {k}: `{v}`" for k, v in notes.items()]
        lines += _per_block_table(result, problem, ns[-1])
    lines += [
        "",
        "Reading the tables: at N = 1 every `hbp` row (all four curvatures) and the Kronecker "
        "rows on linear layers equal the exact block to round-off; from N = 1 to N = 8 their "
        "error jumps to its batch-averaging level, which need not keep growing with N (a "
        "batch average converges to a population quantity, not to the exact batch block). "
        "The exact-factor `sqrt` and the exact diagonals are consistency checks (round-off); "
        "a diagonal's full-block error is the off-diagonal share of the block. Monte-Carlo "
        "rows shrink with M and with N (more sampled labels). All libraries' Monte-Carlo rows "
        "use the same seeds: where they sample labels the same way, their rows coincide "
        "draw for draw (a paired comparison). Convolution weights: no Kronecker row is exact, "
        "not even at N = 1 (KFC drops the correlations between output positions); curvgraph "
        "`kflr`/`kfac` use KFC's scaling (input factor divided by N P, P = output positions) "
        "like curvlinops, BackPACK's output factor is the GGN of the conv bias (positions "
        "summed before the outer product), P times KFC's scale. Conv biases: curvgraph and "
        "BackPACK give the exact block, curvlinops a KFC-style one.",
        "",
    ]
    return "\n".join(lines)


def _per_block_table(result: Dict[str, Any], problem: str, n: str) -> List[str]:
    """Error of every block at batch size ``n`` (mean over seeds; diagonal rows: diagonal)."""
    blocks = list(result["problems"][problem]["parameters"])
    lines = [
        "",
        f"Per block at N={n}:",
        "",
        "| method | " + " | ".join(blocks) + " |",
        "|---|" + "---:|" * len(blocks),
    ]
    for key, label, suffix in _rows(result):
        entry = result["summary"].get(problem, {}).get(key, {}).get(n)
        if entry is None or entry["status"] != "ok":
            cells = ["n/a"] * len(blocks)
        else:
            field = "error_diag" if suffix else "error"
            cells = [_fmt(entry["blocks"][b][field]) for b in blocks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# -- plot ------------------------------------------------------------------------------------

_STYLE = {"curvgraph": "-", "backpack": "--", "curvlinops": ":"}


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """``accuracy.png``: block-diagonal error vs N per method (log-log), a panel per problem.

    Uses matplotlib's Agg canvas directly, so the global backend is left alone.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = list(result["problems"])
    rows = _rows(result)
    columns = min(2 if len(problems) == 4 else 3, len(problems))
    lines_of_panels = math.ceil(len(problems) / columns)
    fig = Figure(figsize=(4.6 * columns + 3.6, 3.8 * lines_of_panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines_of_panels, columns, squeeze=False)
    cmap = matplotlib.colormaps["tab20"]
    families = list(dict.fromkeys(result["methods"][key]["family"] for key, _, _ in rows))
    shades = [cmap(i) for i in range(0, 20, 2)] + [cmap(i) for i in range(1, 20, 2)]
    colour = {f: shades[i % len(shades)] for i, f in enumerate(families)}
    handles = {}
    for index, problem in enumerate(problems):
        ax = axes[index // columns][index % columns]
        summary = result["summary"].get(problem, {})
        for key, label, suffix in rows:
            entries = summary.get(key, {})
            xs, ys = [], []
            for n in result["config"]["batch_sizes"]:
                e = entries.get(str(n))
                if e is not None and e["status"] == "ok":
                    xs.append(n)
                    ys.append(max(e["blockdiag" + suffix], LOG_FLOOR))
            if not xs:
                continue
            (line,) = ax.plot(
                xs,
                ys,
                _STYLE.get(result["methods"][key]["library"], "-"),
                marker="o" if not suffix else "x",
                color=colour[result["methods"][key]["family"]],
                label=label,
                markersize=4,
            )
            handles[label] = line
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(result["config"]["batch_sizes"])
        ax.set_xticklabels([str(n) for n in result["config"]["batch_sizes"]])
        ax.set_xlabel("batch size N")
        ax.set_ylabel("relative error (block-diagonal)")
        ax.set_title(problem, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for index in range(len(problems), lines_of_panels * columns):
        axes[index // columns][index % columns].set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside right center",
        fontsize=7,
        title="solid: curvgraph, dashed: BackPACK, dotted: curvlinops",
        title_fontsize=7,
    )
    fig.suptitle(
        f"Accuracy vs exact blocks (float64; exact zeros drawn at {LOG_FLOOR:g})", fontsize=11
    )
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=110)
    return [path]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="quick", choices=sorted(SUITES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and plots")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.suite, args.device, not args.no_progress)
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
