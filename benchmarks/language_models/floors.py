"""Operation-count floors of the section's curvgraph candidates, in units of one gradient.

Counted as :mod:`benchmarks.cost.floors` counts: multiply-adds of the matrix products
(``torch.utils.flop_counter``'s registry: ``mm``, ``addmm``, ``bmm``, convolutions; on the CPU
the fused attention kernel is not in the registry, so attention's ``T^2`` products are left
out of the gradient and of every floor alike, which at ``T = 128`` is below 1% of GPT-2's
work), elementwise work left out, at the gradient's FLOP rate. The gradient is
``zero_grad`` + forward + cross-entropy + ``backward`` of the plain model on the same batch.

- **kfac pass** (beyond the forward + backward): the backpropagation of the one sampled
  loss column through the network (the gradient's backward without its weight-gradient
  products, which the pass does not need: its ``G`` factors are the propagated columns
  themselves) plus, per Kronecker factor (``nn.Linear`` and Hugging Face ``Conv1D`` weights,
  ``M`` = ``N T`` positions), ``M d^2 / 2`` multiply-adds for a dense factor ``X^T X`` when
  ``M >= d``; when ``M < d`` the thin root ``X`` (``M x d``) is the cheaper storage and costs
  nothing to form. Tied weights and embeddings add nothing (lower floor).
  :mod:`benchmarks.cost.floors` counts the dense factors only and leaves the Monte-Carlo
  backpropagation out; ``kfac_pass_dense_only`` is that count, for comparison.
- **diag pass** (Monte-Carlo, one column): one backward of the sampled column with
  per-sample weight gradients, the same multiply-adds as the gradient's backward.
- **exact block products** (one vector per block, every block): for each parameter block
  ``b``, its forward tangent from the first op that reads it to the logits and the backward
  of ``H J_b v_b`` from the logits to it: at least twice the forward multiply-adds from that
  op on (a tangent of one block cannot share arithmetic with another's). The preparation is
  not counted.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from benchmarks.language_models.models import Built, kronecker_layers

__all__ = ["operation_floors"]


class _OrderedFlops(TorchDispatchMode):
    """Every op's FLOPs in call order, with the storages of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops: List[Dict[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flops = 0
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        storages = set()
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                storages.add(a.untyped_storage().data_ptr())
        self.ops.append({"flops": flops, "storages": storages})
        return out


def operation_floors(built: Built) -> Dict[str, Any]:
    """Floors of the section's candidates as multiples of one gradient's FLOPs (see above)."""
    model = built.model
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as forward:
        loss = built.loss(built.logits(built.ids))
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    gradient = fwd + bwd
    layers = kronecker_layers(built)
    weight_grads = sum(2 * lay["positions"] * lay["d_in"] * lay["d_out"] for lay in layers)
    dense = thin = 0
    for lay in layers:
        if lay["tied"]:
            continue
        for d in (lay["d_in"], lay["d_out"]):
            cost = lay["positions"] * d * d  # FLOPs = 2 MACs of M d^2 / 2
            dense += cost
            thin += cost if lay["positions"] >= d else 0
    # forward FLOPs from each block's first use on
    recorder = _OrderedFlops()
    with torch.no_grad(), recorder:
        built.loss(built.logits(built.ids))
    suffix = [0] * (len(recorder.ops) + 1)
    for i in range(len(recorder.ops) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + recorder.ops[i]["flops"]
    exact = 0
    blocks = {}
    for name, p in model.named_parameters():
        ptr = p.untyped_storage().data_ptr()
        first = next((i for i, op in enumerate(recorder.ops) if ptr in op["storages"]), None)
        down = suffix[first] if first is not None else fwd
        blocks[name] = down / gradient if gradient else float("nan")
        exact += 2 * down
    mc_backward = max(bwd - weight_grads, 0)
    return {
        "gradient_flops": int(gradient),
        "forward_flops": int(fwd),
        "backward_flops": int(bwd),
        "kfac_pass": (mc_backward + thin) / gradient,
        "kfac_pass_dense_only": dense / gradient,
        "diag_pass": bwd / gradient,
        "exact_product": exact / gradient,
        "exact_product_blocks": len(blocks),
        "layers": layers,
    }
