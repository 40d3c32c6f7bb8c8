"""Loss Hessians w.r.t. the model output, summed over the batch (docs/architecture.md, Mathematics).

``loss_hessian(loss, outputs) = sum_n d2L / dz_n2`` (``C x C``) is the bpexts
``batch_summed_hessian``. Cross-entropy (also spelled ``nll_loss(log_softmax(z))``), MSE,
binary cross-entropy on logits (``binary_cross_entropy_with_logits(z, t)`` or
``binary_cross_entropy(sigmoid(z), t)``) and ``nll_loss`` on log-probabilities are
recognised from the autograd graph and use closed forms; any other loss (or an unusual
configuration such as class weights) goes through autograd. Every curvature method here
assumes that the loss is a sum of per-sample terms of the outputs, ``L = sum_n l_n(z_n)``;
:func:`recognise` refuses a loss that couples samples or reaches a parameter other than
through the outputs (:class:`LossStructureError`).

Modules: :mod:`~curvgraph.losses.autograd_nodes` (the only reader of autograd internals:
what the graph says about the loss op), :mod:`~curvgraph.losses.models` (the
:class:`LossModel` classes), :mod:`~curvgraph.losses.tokens` (cross-entropy per token of
``[N, T, V]`` logits), :mod:`~curvgraph.losses.freed` (cross-entropy after
``loss.backward()`` freed its targets: the counted samples from ``dL/dout``),
:mod:`~curvgraph.losses.recognition` (:func:`recognise`, :func:`loss_hessian`).
"""

from curvgraph.losses.models import (
    AutogradLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    LinearLoss,
    LossModel,
    MSELoss,
    UnknownLikelihoodError,
)
from curvgraph.losses.recognition import LossStructureError, loss_hessian, recognise
from curvgraph.losses.tokens import TokenCrossEntropyLoss

__all__ = [
    "AutogradLoss",
    "BinaryCrossEntropyLoss",
    "CrossEntropyLoss",
    "LinearLoss",
    "LossModel",
    "LossStructureError",
    "MSELoss",
    "TokenCrossEntropyLoss",
    "UnknownLikelihoodError",
    "loss_hessian",
    "recognise",
]
