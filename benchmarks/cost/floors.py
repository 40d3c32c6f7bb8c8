"""Operation-count floors: the least arithmetic a computation needs, relative to a gradient.

A goal such as "a product with prepared Kronecker blocks at most 0.1x a gradient" can be out
of reach for any implementation when the arithmetic alone exceeds it. These floors count
multiply-adds (MACs) of the cheapest exact algorithm for each layer with Kronecker structure
(``nn.Linear``, ``nn.Conv2d`` weights; biases are left out, which only lowers the floor) and
divide by the gradient's operation count measured with ``torch.utils.flop_counter`` on the
same batch. A floor assumes the computation runs at the gradient's FLOP rate.

For a weight ``W`` of shape ``[d_out, d_in]`` seen at ``M = N P`` positions (``P`` output
positions of a convolution, 1 for a linear layer) with factors ``G`` ``[d_out, d_out]`` and
``A`` ``[d_in, d_in]``:

- product ``G V A``: dense factors cost ``d_out d_in (d_out + d_in)``; factors of rank
  ``r_G = min(d_out, M s)`` (``s`` loss-factor columns: 1 for KFAC's single Monte-Carlo
  sample, C classes for KFLR) and ``r_A = min(d_in, M)`` stored as ``U U^T`` cost at least
  ``d_out d_in (r_G + r_A)``; the floor is the smaller of the two.
- KFAC factors: ``A = X^T X`` and ``G = S^T S`` as symmetric rank-k updates,
  ``M (d_in^2 + M_s d_out^2) / 2`` with ``M_s = M`` (one sample), ignoring the
  backpropagation of the Monte-Carlo factor (which only raises the true floor).
- HBP's GGN pass with averaged Jacobians (``method="hbp"``), for a chain of linear layers on
  ``[N, d]`` inputs (``None`` for other models): every output matrix has rank at most ``C``
  (the loss Hessian's), so its root ``R`` ``[C, d_out]`` is pulled back through every layer
  but the first (``C d_out d_in``) and each layer's ``G = R^T R`` is formed once, as the
  symmetric ``C d_out^2 / 2`` (the weight's Kronecker factor; a linear bias block is the
  same matrix). Activations scale the root's columns (``C d``, left out).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["operation_floors"]


def _kronecker_layers(model: nn.Module, x: torch.Tensor) -> List[Dict[str, int]]:
    """``d_out``, ``d_in`` and positions ``M`` of every Linear / Conv2d weight for ``x``."""
    layers: List[Dict[str, int]] = []
    handles = []

    def record(module, inputs, output):
        if isinstance(module, nn.Linear):
            positions = inputs[0].numel() // inputs[0].shape[-1]
            d_out, d_in = module.weight.shape
            layers.append({"d_out": d_out, "d_in": d_in, "positions": positions})
        else:
            positions = output.shape[0] * output[0, 0].numel()
            d_out, d_in = module.weight.shape[0], module.weight[0].numel()
            kernel = module.weight[0, 0].numel()
            layers.append({"d_out": d_out, "d_in": d_in, "positions": positions, "kernel": kernel})

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.requires_grad:
            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return layers


def operation_floors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, num_classes: int
) -> Dict[str, Any]:
    """Floors of issue 4's Kronecker quantities as multiples of one gradient's operations.

    Args:
        model: the benchmark's model (hooks are added and removed again).
        x: the batch's inputs.
        y: the batch's labels.
        loss_fn: ``loss_fn(outputs, y)`` (the gradient is that loss's backward).
        num_classes: ``C``, the loss factor's columns for KFLR.

    Returns:
        ``{"gradient_flops", "kfac_pass", "kfac_product", "kflr_product", "hbp_pass",
        "layers"}``; the ratios are floor FLOPs / gradient FLOPs (``hbp_pass`` ``None``
        unless the model is a chain of linear layers on ``[N, d]`` inputs).
    """
    with FlopCounterMode(display=False) as counter:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    gradient = counter.get_total_flops()
    layers = _kronecker_layers(model, x)

    def product(columns: int) -> int:
        total = 0
        for layer in layers:
            d_out, d_in, m = layer["d_out"], layer["d_in"], layer["positions"]
            dense = d_out + d_in
            low_rank = min(d_out, m * columns) + min(d_in, m)
            total += d_out * d_in * min(dense, low_rank)
        return 2 * total  # FLOPs = 2 MACs

    factors = sum(
        layer["positions"] * (layer["d_in"] ** 2 + layer["d_out"] ** 2) // 2 for layer in layers
    )
    hbp = _hbp_pass(layers, x.shape[0], num_classes)
    return {
        "gradient_flops": gradient,
        "kfac_pass": 2 * factors / gradient,
        "kfac_product": product(1) / gradient,
        "kflr_product": product(num_classes) / gradient,
        "hbp_pass": None if hbp is None else 2 * hbp / gradient,
        "layers": layers,
    }


def _hbp_pass(layers: List[Dict[str, int]], n: int, num_classes: int) -> Optional[int]:
    """MACs of HBP's GGN pass on a chain of linear layers (module docstring), else ``None``."""
    if not layers or any(layer["positions"] != n or "kernel" in layer for layer in layers):
        return None
    total = 0
    for i, layer in enumerate(layers):  # in the order of the forward pass
        d_out, d_in = layer["d_out"], layer["d_in"]
        total += num_classes * d_out * d_out // 2 + (num_classes * d_out * d_in if i else 0)
    return total
