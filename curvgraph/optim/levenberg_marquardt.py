"""Levenberg-Marquardt adaptation of CG-Newton's damping (Martens 2010, section 4.1).

The step ``s`` is judged by the reduction ratio of the (undamped) quadratic model
``q(s) = g^T s + 1/2 s^T C s``:

    rho = (L(theta + s) - L(theta)) / q(s).

With ``lambda = alpha / (1 - alpha)`` (so that ``(1 - alpha) C + alpha I`` is proportional
to ``C + lambda I``), ``lambda <- lambda * factor`` when ``rho < 1/4`` (the model was too
optimistic: more damping) and ``lambda <- lambda / factor`` when ``rho > 3/4``; ``lambda``
stays in ``[LAMBDA_MIN, LAMBDA_MAX]`` and ``alpha = lambda / (1 + lambda)``.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature

__all__ = ["LAMBDA_MAX", "LAMBDA_MIN", "adapted_alpha", "model_change", "reduction_ratio"]

LAMBDA_MIN, LAMBDA_MAX = 1e-8, 1e8


def model_change(
    gradients: Dict[str, Tensor], steps: Dict[str, Tensor], curvature: BlockCurvature
) -> Tensor:
    """``q(s) = sum_b g_b^T s_b + 1/2 s_b^T C_b s_b`` (one batched product over the blocks)."""
    products = curvature.matvec(steps)
    terms = [(gradients[n] * s).sum() + 0.5 * (s * products[n]).sum() for n, s in steps.items()]
    return torch.stack(terms).sum()


def reduction_ratio(new_loss: float, old_loss: float, change: float) -> float:
    """``rho = (new - old) / q``; ``-inf`` (a bad step) when ``q >= 0`` or a loss is not finite."""
    if not (math.isfinite(new_loss) and math.isfinite(old_loss)) or not change < 0:
        return -math.inf
    return (new_loss - old_loss) / change


def adapted_alpha(alpha: float, rho: float, factor: float) -> float:
    """The damping after a step with reduction ratio ``rho`` (see the module)."""
    lam = alpha / (1 - alpha)
    if rho < 0.25:  # from alpha = 0, the first increase goes to LAMBDA_MIN * factor
        lam = max(lam, LAMBDA_MIN) * factor
    elif rho > 0.75:
        lam /= factor
    lam = min(max(lam, LAMBDA_MIN), LAMBDA_MAX)
    return lam / (1 + lam)
