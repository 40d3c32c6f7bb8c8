"""Loss Hessians w.r.t. the model output, summed over the batch (design 3.1).

``loss_hessian(loss, outputs) = sum_n d2L / dz_n2`` (``C x C``) is the bpexts
``batch_summed_hessian``. Cross-entropy (also spelled ``nll_loss(log_softmax(z))``), MSE,
binary cross-entropy on logits (``binary_cross_entropy_with_logits(z, t)`` or
``binary_cross_entropy(sigmoid(z), t)``) and ``nll_loss`` on log-probabilities are
recognised from the autograd graph and use closed forms; any other loss (or an unusual
configuration such as class weights) goes through autograd, assuming, as every curvature
method here does, that the loss is a sum of per-sample terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["loss_hessian", "recognise", "LossModel", "BinaryCrossEntropyLoss", "LinearLoss"]

_MEAN, _SUM = 1, 2  # ATen's reduction codes as saved on the autograd nodes


def loss_hessian(loss: Tensor, outputs: Tensor) -> Tensor:
    """``sum_n d2L/dz_n2`` for a scalar ``loss`` computed from ``outputs`` ``[N, *]``.

    Closed forms (``p_n = softmax(z_n)``, ``C`` features per sample):

    - cross-entropy, mean: ``(1/N) sum_n (diag p_n - p_n p_n^T)``; sum: without ``1/N``.
    - MSE, mean over all ``N C`` entries: ``(2/C) I``; sum: ``2 N I``.
    - binary cross-entropy on logits, ``p = sigmoid(z)``: ``diag(sum_n p_n (1 - p_n))``
      divided by ``N C`` (mean) or not (sum).
    - ``nll_loss`` applied to the outputs themselves (log-probabilities): ``0`` (the loss
      is linear in them; the curvature comes from the model's ``log_softmax`` residual).

    Both closed forms work after ``loss.backward()``. Cross-entropy targets equal to the
    default ``ignore_index=-100`` can only be detected before ``loss.backward()`` frees
    them; any other loss needs its autograd graph, so call this before ``backward()``.

    Args:
        loss: scalar loss.
        outputs: the model output the loss was computed from.

    Returns:
        The ``C x C`` matrix, with the dtype and device of ``outputs``.

    Raises:
        FloatingPointError: the loss is NaN or infinite.
        ValueError: the loss is not a scalar or does not depend on ``outputs``.
    """
    return recognise(loss, outputs).summed_hessian()


def recognise(loss: Tensor, outputs: Tensor) -> LossModel:
    """The loss as a :class:`LossModel` (closed form if recognised, else autograd)."""
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (reduction 'mean' or 'sum'), got shape {tuple(loss.shape)}"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss is {loss.item()}: curvature of a non-finite loss is undefined (check the "
            "learning rate, the inputs, or the model's outputs for NaN/inf)"
        )
    if outputs.dim() < 1 or outputs.grad_fn is None and not outputs.requires_grad:
        raise ValueError("outputs must be the model output the loss was computed from")
    for candidate in (_cross_entropy, _mse, _binary_cross_entropy, _nll_of_outputs):
        model = candidate(loss, outputs)
        if model is not None:
            return model
    return AutogradLoss(loss, outputs)


class LossModel:
    """Per-sample loss Hessians ``d2L/dz_n2`` of a loss, in three forms.

    Index convention: ``K`` columns, ``N`` samples, ``C`` output features per sample.
    """

    def summed_hessian(self) -> Tensor:
        """``sum_n d2L/dz_n2`` (``C x C``)."""
        raise NotImplementedError

    def hessian_product(self, tangents: Tensor) -> Tensor:
        """``(d2L/dz_n2) t_n`` for tangents ``[K, N, *out]``, per sample."""
        raise NotImplementedError

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:
        """Factors ``S_n`` ``[K, N, *out]`` with ``sum_k s_nk s_nk^T = d2L/dz_n2``.

        With ``mc_samples > 0``, ``K = mc_samples`` Monte-Carlo columns whose outer products
        are unbiased for the Hessian (labels sampled from the model's predictive
        distribution); else exact columns (``K = C``).
        """
        raise NotImplementedError


class CrossEntropyLoss(LossModel):
    """``l_n = -log softmax(z_n)_y``: ``d2 l_n/dz_n2 = diag p_n - p_n p_n^T``, times ``scale``."""

    def __init__(self, outputs: Tensor, scale: float):
        self.p = torch.softmax(outputs.detach(), dim=1)
        self.scale = scale

    def summed_hessian(self) -> Tensor:  # noqa: D102
        p = self.p
        return (torch.diag(p.sum(0)) - p.T @ p) * self.scale

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        p = self.p
        return self.scale * (p * tangents - p * (p * tangents).sum(-1, keepdim=True))

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        p, root = self.p, self.p.sqrt()
        if mc_samples:
            labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
            onehot = torch.nn.functional.one_hot(labels.T, p.shape[1]).to(p)  # [M, N, C]
            return (p - onehot) * (self.scale / mc_samples) ** 0.5
        # columns k of S_n = diag(sqrt p) - p sqrt(p)^T
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        factors = eye[:, None, :] * root.T[:, :, None] - root.T[:, :, None] * p[None]
        return factors * self.scale**0.5


class MSELoss(LossModel):
    """``l = ||z - y||^2`` per entry, times ``scale``: ``d2L/dz_n2 = 2 scale I``."""

    def __init__(self, outputs: Tensor, scale: float):
        self.outputs = outputs.detach()
        self.scale = scale

    def summed_hessian(self) -> Tensor:  # noqa: D102
        n, c = self.outputs.shape[0], self.outputs[0].numel()
        eye = torch.eye(c, dtype=self.outputs.dtype, device=self.outputs.device)
        return 2 * self.scale * n * eye

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        return 2 * self.scale * tangents

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        z = self.outputs
        if mc_samples:
            noise = torch.randn(
                mc_samples, *z.shape, generator=generator, dtype=z.dtype, device=z.device
            )
            return noise * (2 * self.scale / mc_samples) ** 0.5
        c = z[0].numel()
        eye = torch.eye(c, dtype=z.dtype, device=z.device).reshape(c, 1, *z.shape[1:])
        return eye.expand(c, *z.shape) * (2 * self.scale) ** 0.5


def _cross_entropy(loss: Tensor, outputs: Tensor):
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "NllLossBackward0" or outputs.dim() != 2:
        return None
    log_softmax = fn.next_functions[0][0]
    if type(log_softmax).__name__ != "LogSoftmaxBackward0":
        return None
    if log_softmax.next_functions[0][0] is not outputs.grad_fn:
        return None
    try:
        if fn._saved_weight is not None:
            return None  # class weights: the autograd path handles them
    except RuntimeError:  # weights were saved, and freed by loss.backward()
        raise RuntimeError(
            "cross_entropy with class weights: call loss_hessian before loss.backward() (or "
            "backward with retain_graph=True)"
        ) from None
    ignore_index = fn._saved_ignore_index
    if ignore_index >= 2**63:  # an int64 exposed as uint64
        ignore_index -= 2**64
    try:
        if (fn._saved_target == ignore_index).any():
            return None  # ignored samples: the autograd path handles them
    except RuntimeError:  # freed by loss.backward()
        if ignore_index != -100:
            raise RuntimeError(
                f"cross_entropy with ignore_index={ignore_index}: call loss_hessian before "
                "loss.backward() (or backward with retain_graph=True) so that ignored samples "
                "can be detected"
            ) from None
    reduction = fn._saved_reduction
    if reduction not in (_MEAN, _SUM):
        return None
    return CrossEntropyLoss(outputs, 1.0 / outputs.shape[0] if reduction == _MEAN else 1.0)


def _mse(loss: Tensor, outputs: Tensor):
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "MseLossBackward0":
        return None
    if fn.next_functions[0][0] is not outputs.grad_fn or fn.next_functions[1][0] is not None:
        return None  # the target depends on parameters too: use autograd
    try:
        if fn._saved_self.shape != outputs.shape:
            return None  # broadcasting against the target
    except RuntimeError:  # freed by loss.backward(); mse_loss warns about broadcasting itself
        pass
    if fn._saved_reduction == _MEAN:
        return MSELoss(outputs, 1.0 / outputs.numel())
    if fn._saved_reduction == _SUM:
        return MSELoss(outputs, 1.0)
    return None


class BinaryCrossEntropyLoss(LossModel):
    """``l = -t log p - (1 - t) log(1 - p)`` per entry, ``p = sigmoid(z)``, times ``scale``.

    ``d2 l / dz2 = p (1 - p)`` entry by entry (independent of ``t``), so the per-sample
    Hessian is diagonal: ``d2L/dz_n2 = scale * diag(p_n (1 - p_n))``. Exact factor: the
    columns ``sqrt(scale p (1 - p)) e_c``; Monte-Carlo: labels ``y ~ Bernoulli(p)`` give
    ``s = sqrt(scale / M) (p - y)`` with ``E[s s^T] = diag(p (1 - p)) scale / M`` (entries
    independent).
    """

    def __init__(self, outputs: Tensor, scale: float):
        self.p = torch.sigmoid(outputs.detach())
        self.curvature = self.p * (1 - self.p) * scale  # [N, *out]
        self.scale = scale

    def summed_hessian(self) -> Tensor:  # noqa: D102
        return torch.diag(self.curvature.sum(0).flatten())

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        return self.curvature * tangents

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        p = self.p
        if mc_samples:
            uniform = torch.rand(
                mc_samples, *p.shape, generator=generator, dtype=p.dtype, device=p.device
            )
            labels = (uniform < p).to(p.dtype)
            return (p - labels) * (self.scale / mc_samples) ** 0.5
        c = p[0].numel()
        eye = torch.eye(c, dtype=p.dtype, device=p.device).reshape(c, 1, *p.shape[1:])
        return eye * self.curvature.sqrt()


class LinearLoss(LossModel):
    """A loss linear in the outputs (``nll_loss`` of log-probabilities): zero Hessian.

    The Hessian of the model is then entirely in the residuals of the layers before (e.g.
    the ``log_softmax`` that produced the outputs), and the GGN at this split is zero: end
    the model with logits and use ``cross_entropy`` for the usual GGN of a classifier.
    """

    def __init__(self, outputs: Tensor):
        self.outputs = outputs.detach()

    def summed_hessian(self) -> Tensor:  # noqa: D102
        c = self.outputs[0].numel()
        return self.outputs.new_zeros(c, c)

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        return torch.zeros_like(tangents)

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        return self.outputs.new_zeros(max(mc_samples, 1), *self.outputs.shape)


def _binary_cross_entropy(loss: Tensor, outputs: Tensor):
    """``bce_with_logits(z, t)`` or ``bce(sigmoid(z), t)``, no weights, mean or sum."""
    fn = loss.grad_fn
    name = type(fn).__name__ if fn is not None else ""
    if name == "BinaryCrossEntropyWithLogitsBackward0":
        if fn._saved_pos_weight is not None:
            return None  # a positive-class weight: the autograd path handles it
        logits = fn.next_functions[0][0]
    elif name == "BinaryCrossEntropyBackward0":
        sigmoid = fn.next_functions[0][0]
        if type(sigmoid).__name__ != "SigmoidBackward0":
            return None  # probabilities from elsewhere: the autograd path
        logits = sigmoid.next_functions[0][0]
    else:
        return None
    if logits is not outputs.grad_fn or fn.next_functions[1][0] is not None:
        return None  # not the outputs, or targets that depend on parameters
    try:
        if fn._saved_weight is not None:
            return None  # weights: the autograd path handles them
    except RuntimeError:  # weights were saved, and freed by loss.backward()
        raise RuntimeError(
            "binary cross-entropy with weights: call loss_hessian before loss.backward() (or "
            "backward with retain_graph=True)"
        ) from None
    try:
        if fn._saved_self.shape != outputs.shape:
            return None  # broadcasting against the target
    except RuntimeError:  # freed by loss.backward(); the loss checks the shapes itself
        pass
    if fn._saved_reduction == _MEAN:
        return BinaryCrossEntropyLoss(outputs, 1.0 / outputs.numel())
    if fn._saved_reduction == _SUM:
        return BinaryCrossEntropyLoss(outputs, 1.0)
    return None


def _nll_of_outputs(loss: Tensor, outputs: Tensor):
    """``nll_loss(z, y)`` on the outputs themselves: linear in ``z``."""
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "NllLossBackward0":
        return None
    if fn.next_functions[0][0] is not outputs.grad_fn:
        return None
    return LinearLoss(outputs)


class AutogradLoss(LossModel):
    """Any loss, by double backward (assumes a sum of per-sample terms)."""

    def __init__(self, loss: Tensor, outputs: Tensor):
        self.outputs = outputs
        self.name = type(loss.grad_fn).__name__
        try:
            (self.grad,) = torch.autograd.grad(loss, outputs, create_graph=True)
        except RuntimeError as error:
            raise self._freed(error) from error

    def _freed(self, error: Exception) -> RuntimeError:
        return RuntimeError(
            f"this loss ({self.name}) is differentiated twice with autograd, which needs its "
            "graph: call loss_hessian (or cg.curvature) before loss.backward(), or call "
            f"loss.backward(retain_graph=True) ({error})"
        )

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        if self.grad.grad_fn is None:  # the loss is linear in the outputs
            return torch.zeros_like(tangents)
        rows = []
        for t in tangents:
            try:
                (row,) = torch.autograd.grad(
                    self.grad, self.outputs, grad_outputs=t, retain_graph=True, allow_unused=True
                )
            except RuntimeError as error:
                raise self._freed(error) from error
            rows.append(torch.zeros_like(t) if row is None else row.detach())
        return torch.stack(rows)

    def per_sample_hessians(self) -> Tensor:
        """``d2L/dz_n2`` for every sample, ``[N, C, C]``."""
        n, c = self.outputs.shape[0], self.outputs[0].numel()
        eye = torch.eye(c, dtype=self.outputs.dtype, device=self.outputs.device)
        columns = eye.reshape(c, 1, *self.outputs.shape[1:]).expand(c, *self.outputs.shape)
        products = self.hessian_product(columns).reshape(c, n, c)  # [C (column), N, C]
        hessians = products.permute(1, 2, 0)
        return (hessians + hessians.transpose(1, 2)) / 2

    def summed_hessian(self) -> Tensor:  # noqa: D102
        return self.per_sample_hessians().sum(0)

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        if mc_samples:
            raise NotImplementedError(
                "Monte-Carlo factors need a known likelihood (cross-entropy or MSE); use exact "
                "factors (mc_samples=0) for this loss"
            )
        eigenvalues, eigenvectors = torch.linalg.eigh(self.per_sample_hessians())
        factors = eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(-2)  # [N, C, C]
        return factors.permute(2, 0, 1).reshape(-1, *self.outputs.shape)
