"""The transformer zoo's checks: capture status, exact GGN products, Kronecker factors.

:func:`exact_check` (``method="exact"`` against ``torch.func``) and :func:`kfac_check`
(``kfac_approx`` against curvlinops' ``KFACLinearOperator``), as described in
:mod:`benchmarks.zoo_transformers`.
"""

from __future__ import annotations

import gc
import random
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

import curvgraph
from benchmarks.zoo_transformer_models import (
    CURVLINOPS_SEED,
    DTYPE,
    ROUNDOFF,
    Architecture,
    example,
    loss_of,
)

# -- capture ---------------------------------------------------------------------------------

#: reasons of UnsupportedOpError nodes that the autograd fallback can serve
_FIXABLE = ("no rule", "unsupported", "arguments do not match")


def trace(arch: Architecture, model: nn.Module, fallback: bool) -> curvgraph.CurvGraph:
    """``curvgraph.trace`` of ``model`` on the example batch (``capture="auto"``)."""
    args, kwargs, _ = example(arch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvgraph.trace(model, *args, fallback=fallback, output=arch.output, **kwargs)


def _trace_status(arch: Architecture, model: nn.Module, fallback: bool):
    """``(graph or None, status)`` as the torchvision zoo records it."""
    try:
        return trace(arch, model, fallback), {"ok": True}
    except curvgraph.UnsupportedOpError as error:
        missing = {op for _, op, _, why in error.nodes if why.startswith(_FIXABLE)}
        problems = {why.split(" (")[0] for _, _, _, why in error.nodes}
        problems = {p for p in problems if not p.startswith(_FIXABLE)}
        return None, {"ok": False, "missing": sorted(missing), "problems": sorted(problems)}
    except Exception as error:  # noqa: BLE001 - recorded in the table
        return None, {"ok": False, "error": _short(error)}


def _short(error: BaseException, length: int = 400) -> str:
    """``Type: message`` on one line, without install paths.

    A capture error of both routes gives the first sentence of each route's report.
    """
    text = str(error)
    routes = [line for line in text.splitlines() if line.startswith("- ")]
    if routes:  # "neither capture route could capture ...:\n- torch.fx ...\n- torch.export ..."
        text = " ".join(line.split(". ")[0] for line in routes)
    text = re.sub(r"\S*/site-packages/", "", " ".join(text.split()))
    text = text.replace(f"{Path(__file__).resolve().parents[1]}/", "")
    return f"{type(error).__name__}: {text[:length]}"


def float32_casts(cg) -> int:
    """Nodes of the captured graph that compute on activations in float32.

    A cast to ``torch.float32`` or an op with ``dtype=torch.float32``; nodes computed
    without parameters (constants: rotary tables, masks) are not counted.
    """
    count = 0
    for node in cg.graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if node.meta.get("curvgraph_constant"):
            continue
        if torch.float32 in (*node.args, *node.kwargs.values()):
            count += 1
    return count


# -- exact GGN block products ----------------------------------------------------------------


def exact_check(
    arch: Architecture, model: nn.Module, cg, blocks: int = 3, seed: int = 0
) -> Dict[str, Any]:
    """Relative errors of ``method="exact"`` GGN block products against ``torch.func``.

    Blocks are drawn in a random order (``random.Random(seed)``) until ``blocks`` of them
    have a nonzero reference product; a block whose reference is zero (see
    :func:`reference_product`) is listed under ``"zero"``, and its product must be below the
    tolerance times the largest reference product of the checked blocks (else its error is
    ``inf``).

    Returns:
        ``{"errors": {block: relative error}, "zero": [blocks]}``.
    """
    args, kwargs, labels = example(arch, model, seed)
    out = cg(*args, **kwargs)
    largest = F.softmax(out.detach(), dim=-1).max().item()
    if largest > 1 - 1e-6:
        raise RuntimeError(f"the softmax is saturated (probability {largest}): check vacuous")
    curv = cg.curvature(loss_of(out, labels), out, curvature="ggn", method="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    order = sorted(curv)
    random.Random(seed).shuffle(order)
    errors, zero, scales = {}, {}, []
    for name in order:
        if len(errors) == blocks:
            break
        v = torch.randn(params[name].shape, generator=generator, dtype=DTYPE)
        expected = reference_product(arch, model, params, args, kwargs, labels, name, v)
        product = curv[name].matvec(v.flatten()).reshape(v.shape)
        scale = expected.abs().max()
        if scale == 0:
            zero[name] = product.abs().max().item()
            continue
        scales.append(scale.item())
        errors[name] = ((product - expected).abs().max() / scale).item()
    for name, size in zero.items():  # zero blocks: products at round-off of the others
        if size > arch.tolerance * max(scales, default=0.0):
            errors[name] = float("inf")
    del cg, out, curv
    gc.collect()
    return {"errors": errors, "zero": sorted(zero)}


def reference_product(arch, model, params, args, kwargs, labels, name: str, v: Tensor) -> Tensor:
    """``J^T H J v`` of block ``name`` with ``torch.func`` alone (math SDPA kernel).

    Zero where ``J v`` is round-off (:data:`ROUNDOFF`): a parameter the outputs do not
    depend on in exact arithmetic, such as the key bias of softmax attention (it adds one
    constant to all scores of a query).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def outputs(theta: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            result = functional_call(model, {**params, name: theta}, args, kwargs)
        return result if arch.output is None else result[arch.output]

    out, jv = jvp(outputs, (params[name],), (v,))
    if jv.abs().max() <= ROUNDOFF * out.abs().max() * v.abs().max():
        return torch.zeros_like(v)  # the outputs do not change along v: a zero block
    _, hjv = jvp(grad(lambda o: loss_of(o, labels)), (out,), (jv,))
    _, pullback = vjp(outputs, params[name])
    return pullback(hjv)[0]


# -- Kronecker factors against curvlinops ----------------------------------------------------


def kfac_layers(model: nn.Module) -> List[str]:
    """The first and the last ``nn.Linear`` whose weight no other module uses."""
    counts: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    linears = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and counts[id(m.weight)] == 1
    ]
    return linears[:1] + linears[-1:] if len(linears) > 1 else []


class _Logits(nn.Module):
    """``X -> model(**X)[output]``: curvlinops passes dict inputs as one argument.

    ``classes_second``: per-token logits as ``[N, V, T]`` (curvlinops reads cross-entropy
    outputs as ``[N, C, ...]``).
    """

    def __init__(self, arch: Architecture, model: nn.Module, classes_second: bool):
        super().__init__()
        self.arch, self.model, self.classes_second = arch, model, classes_second

    def forward(self, X):  # noqa: D102
        if isinstance(X, Tensor):
            out = self.model(X)
        else:
            out = self.model(**X)
        out = out if self.arch.output is None else out[self.arch.output]
        return out.transpose(1, 2) if self.classes_second and out.dim() == 3 else out


def kfac_check(
    arch: Architecture,
    model: nn.Module,
    cg,
    approx: str,
    seed: int = 0,
    fisher: Optional[str] = None,
) -> Dict:
    """Kronecker blocks of :func:`kfac_layers` against curvlinops (module docstring).

    ``fisher``: ``"type-2"`` (``kflr``, cross-entropy) or ``"mc"`` (``kfac``, one sample of
    an MSE loss, curvlinops' seed); default ``"mc"`` for per-token outputs, else
    ``"type-2"``.

    A block whose reference is at round-off of the other's (:data:`ROUNDOFF`) is zero in
    exact arithmetic, e.g. the reduce block of a key projection: the gradients of all keys
    of a softmax sum to zero, so ``sum_t s_t = 0``. It is listed under ``"zero"`` and passes
    (error 0) if curvgraph's products are below the tolerance times the largest reference.

    Returns:
        ``{"errors": {weight: relative error}, "blocks": {weight: block type},
        "zero": [weights], "mode": the comparison}``.
    """
    from curvlinops import KFACLinearOperator

    layers = kfac_layers(model)
    if not layers:
        others = {
            type(m).__name__
            for m in model.modules()
            if type(m) is not nn.Linear and getattr(m, "weight", None) is not None
        }
        others = sorted(k for k in others if "Linear" in k or "Conv1D" in k)
        alike = f"; linear layers are {', '.join(others)}" if others else ""
        raise LookupError(f"fewer than two nn.Linear layers with an untied weight{alike}")
    args, kwargs, labels = example(arch, model, seed, padded=False)  # curvlinops: no padding
    labels = labels.clone()
    labels[labels == -100] = 0  # curvlinops has no ignore_index: every token counts
    mc = (fisher or ("mc" if arch.per_token else "type-2")) == "mc"
    out = cg(*args, **kwargs)
    if mc:
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        generator = torch.Generator().manual_seed(CURVLINOPS_SEED)
        curv = cg.curvature(
            F.mse_loss(out, target),
            out,
            method="kfac",
            kfac_approx=approx,
            mc_samples=1,
            generator=generator,
        )
        loss_func, fisher, y = nn.MSELoss(), "mc", target
    else:
        curv = cg.curvature(loss_of(out, labels), out, method="kflr", kfac_approx=approx)
        loss_func, fisher, y = nn.CrossEntropyLoss(), "type-2", labels
    weights = [f"{layer}.weight" for layer in layers]
    params = dict(model.named_parameters())
    X = args[0] if args else kwargs
    op = KFACLinearOperator(
        _Logits(arch, model, classes_second=not mc),
        loss_func,
        [params[w] for w in weights],
        [(X, y)],
        fisher_type=fisher,
        kfac_approx=approx,
        check_deterministic=False,
        seed=CURVLINOPS_SEED,
        batch_size_fn=None if args else (lambda X: next(iter(X.values())).shape[0]),
    )
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(op.shape[1], 3, generator=generator, dtype=DTYPE)
    expected = op @ vectors
    errors, blocks, zero, start = {}, {}, [], 0
    largest = expected.abs().max()
    for w in weights:
        size = params[w].numel()
        block = curv[w]
        blocks[w] = type(block).__name__
        rows = slice(start, start + size)
        product = torch.stack([block.matvec(vectors[rows, k]) for k in range(3)], 1)
        start += size
        scale = expected[rows].abs().max()
        if scale <= ROUNDOFF * largest:  # zero in exact arithmetic (see the docstring)
            zero.append(w)
            small = product.abs().max() <= arch.tolerance * largest
            errors[w] = 0.0 if small else float("inf")
            continue
        errors[w] = ((product - expected[rows]).abs().max() / scale).item()
    mode = "kfac, MSE, 1 MC sample vs mc" if mc else "kflr, CE vs type-2"
    return {"errors": errors, "blocks": blocks, "zero": zero, "mode": mode}
