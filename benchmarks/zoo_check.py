"""The zoo's exactness check (:mod:`benchmarks.zoo`): curvgraph's GGN blocks against torch.func.

:func:`exact_check` compares, for a few parameter blocks chosen at random with a fixed seed,
the products ``C v`` of ``method="exact"`` with ``J^T H J v`` computed with ``torch.func``
alone (``J`` the Jacobian of the outputs w.r.t. the block, ``H`` the loss Hessian w.r.t. the
outputs), in float64, eval mode, cross-entropy; :func:`tolerance` is the largest relative
error accepted for a model (:data:`TOLERANCE`, or :data:`TOLERANCE_HARDSIGMOID`).
"""

from __future__ import annotations

import gc
import random
import warnings
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

import curvgraph
from benchmarks.zoo_models import calibrate_batch_norm

__all__ = ["TOLERANCE", "TOLERANCE_HARDSIGMOID", "exact_check", "tolerance"]

TOLERANCE = 1e-8
#: torch's forward-mode derivative of hardsigmoid (also inside hardswish) rounds 1/6 to
#: float32, an error of 5e-9 in float64 (``torch.func.jvp(F.hardsigmoid, ...)``), and the
#: reference's ``J v`` needs forward mode (hardsigmoid has no double backward): models with
#: these activations are compared at this tolerance (observed: 6e-8 on MobileNetV3).
TOLERANCE_HARDSIGMOID = 1e-6


def exact_check(
    model: nn.Module, size: int, blocks: int = 3, seed: int = 0, fallback: bool = False
) -> Dict[str, float]:
    """Relative errors ``|C v - J^T H J v| / |J^T H J v|`` of a few random GGN blocks.

    The check must not be vacuous, so the model is first put in a regime where the loss
    Hessian is far from zero:

    - parameters that are exactly zero (zero-initialised heads) get small random values;
    - BatchNorm running statistics are calibrated on the check's input (each layer's
      statistics are those of its input, see :func:`calibrate_batch_norm`): at
      initialisation the running statistics are
      ``mean 0, var 1`` whatever the activations are, so deep networks (inception_v3,
      resnet152) amplify them layer after layer and their logits differ by ``1e7``-``1e12``;
      the softmax is then one-hot in float64, ``H = diag(p) - p p^T`` is exactly 0 and so is
      every reference product. Calibrated, eval-mode BatchNorm is still the affine map
      ``y = gamma (x - mu) / sqrt(var + eps) + beta`` with fixed ``mu, var``: the graph and
      its rules are the same, only the constants are realistic (as in a trained network);
    - a softmax still saturated (a sample's largest probability above ``1 - 1e-6``) and a
      block whose reference product is zero raise instead of passing.

    Args:
        model: a float64 model in eval mode.
        size: input height and width.
        blocks: number of parameter blocks (chosen with ``random.Random(seed)``).
        seed: seed of the block choice, the input, the labels and the vectors.
        fallback: trace with the autograd fallback.

    Returns:
        block name -> relative error (max-norm).
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():  # zero-initialised layers (ViT's head) would make every product 0
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, dtype=dtype))
    x = torch.randn(2, 3, size, size, generator=generator, dtype=dtype)
    calibrate_batch_norm(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = curvgraph.trace(model, fallback=fallback)
    out = cg(x)
    largest = F.softmax(out.detach(), dim=1).max(dim=1).values.max().item()
    if largest > 1 - 1e-6:
        raise RuntimeError(f"the softmax is saturated (probability {largest}): check vacuous")
    y = torch.randint(0, out.shape[1], (2,), generator=generator)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="ggn", method="exact")
    names = sorted(random.Random(seed).sample(sorted(curv), min(blocks, len(curv))))
    params = {n: p.detach() for n, p in model.named_parameters()}
    vectors = {n: torch.randn(params[n].shape, generator=generator, dtype=dtype) for n in names}
    products = curv.matvec(vectors)
    del cg, out, loss, curv  # the recorded forward is not needed by the reference
    gc.collect()  # (it may sit in reference cycles)
    errors = {}
    references = _ggn_vector_products(model, params, x, y, vectors)
    for name, expected in references.items():
        scale = expected.abs().max()
        if scale == 0:  # a vacuous comparison is no check
            raise RuntimeError(f"the reference product of {name!r} is zero: nothing checked")
        errors[name] = ((products[name] - expected).abs().max() / scale).item()
    return errors


def _ggn_vector_products(model, params, x, y, vectors) -> Dict[str, Tensor]:
    """``J_b^T H J_b v_b`` for each block ``b`` of ``vectors``, with torch.func only.

    MultiheadAttention's fused inference kernel and the flash attention kernel have no
    forward-mode derivative, so the reference runs the composite path and the math kernel
    of scaled dot-product attention (the same function). Each block is linearised on its
    own (one forward per block): a pullback w.r.t. all blocks would also return the
    cotangents of the blocks not asked for, a model-size allocation on large heads.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    blocks = {name: params[name] for name in vectors}

    def outputs(values):
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return functional_call(model, {**params, **values}, (x,))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    result = {}
    for name, v in vectors.items():

        def block_outputs(theta, name=name):
            return outputs({name: theta})

        out, jv = jvp(block_outputs, (blocks[name],), (v,))
        _, hjv = jvp(grad(lambda o: F.cross_entropy(o, y)), (out,), (jv,))
        del jv
        _, pullback = vjp(block_outputs, blocks[name])
        result[name] = pullback(hjv)[0]
        del pullback
    return result


def tolerance(model: nn.Module) -> float:
    """Largest relative error accepted for ``model`` (see :data:`TOLERANCE_HARDSIGMOID`)."""
    hard = any(isinstance(m, (nn.Hardsigmoid, nn.Hardswish)) for m in model.modules())
    return TOLERANCE_HARDSIGMOID if hard else TOLERANCE
