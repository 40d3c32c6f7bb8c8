"""The per-sample loss Hessians ``d2L/dz_n2`` of the losses curvgraph knows, and of any other.

A :class:`LossModel` gives them in three forms (the batch sum, products, square-root
factors). The closed forms (cross-entropy, MSE, binary cross-entropy, a loss linear in the
outputs) hold the outputs and a ``scale`` (``1/N`` or ``1/(N C)`` for a mean, ``1`` for a
sum); :class:`AutogradLoss` differentiates any other loss twice with autograd.
:func:`curvgraph.losses.recognise` picks the model of a loss.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.losses.autograd_nodes import node_name

__all__ = [
    "AutogradLoss",
    "BinaryCrossEntropyLoss",
    "CrossEntropyLoss",
    "LinearLoss",
    "LossModel",
    "MSELoss",
    "UnknownLikelihoodError",
]


class UnknownLikelihoodError(CurvGraphError, NotImplementedError):
    """Monte-Carlo factors asked of a loss that is not a known likelihood.

    A :class:`~curvgraph.errors.CurvGraphError` (what a refused curvature call raises) and a
    ``NotImplementedError`` (what it raised before).
    """


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
            noise = _draw(torch.randn, mc_samples, z, generator)
            return noise * (2 * self.scale / mc_samples) ** 0.5
        return _unit_columns(z) * (2 * self.scale) ** 0.5


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
            uniform = _draw(torch.rand, mc_samples, p, generator)
            labels = (uniform < p).to(p.dtype)
            return (p - labels) * (self.scale / mc_samples) ** 0.5
        return _unit_columns(p) * self.curvature.sqrt()


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


class AutogradLoss(LossModel):
    """Any loss, by double backward (assumes a sum of per-sample terms).

    It needs the loss's autograd graph, which ``loss.backward()`` frees: after it, every
    product raises a :class:`~curvgraph.errors.CurvGraphError` (a ``RuntimeError``) that
    says to compute the curvature first or to call ``loss.backward(retain_graph=True)``.
    """

    def __init__(self, loss: Tensor, outputs: Tensor):
        self.outputs = outputs
        self.name = node_name(loss)
        try:
            (self.grad,) = torch.autograd.grad(loss, outputs, create_graph=True)
        except RuntimeError as error:
            raise self._freed(error) from error

    def _freed(self, error: RuntimeError) -> RuntimeError:
        """The clear error for a graph freed by ``loss.backward()``; any other: unchanged."""
        if not _graph_freed(error):
            return error
        return CurvGraphError(freed_graph_message(self.name))

    def hessian_product(self, tangents: Tensor) -> Tensor:  # noqa: D102
        if not self.grad.requires_grad:  # the loss is linear in the outputs
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

    def coupled_sample(self) -> Optional[Tuple[int, List[int]]]:
        """A sample whose loss terms depend on other samples' outputs, or ``None``.

        The curvature methods assume ``L = sum_n l_n(z_n)``: the Hessian w.r.t. the outputs
        is block-diagonal over samples. For every bit ``b`` of the sample index, one
        Hessian-vector product with a random tangent on the samples whose bit ``b`` is set
        must vanish on the others (relative to its norm, tolerance ``sqrt(eps)``); two
        different samples differ in some bit, so ``ceil(log2 N)`` products (of the loss
        only, not of the model) find any coupling between two samples with probability 1.

        Returns:
            ``(m, samples)``: the product from a tangent on ``samples`` is non-zero on
            sample ``m``; ``None`` when the loss is a sum of per-sample terms.
        """
        z = self.outputs
        n = z.shape[0]
        if n < 2 or not self.grad.requires_grad:
            return None  # one sample, or a loss linear in the outputs
        generator = torch.Generator(device=z.device).manual_seed(0)  # the global RNG untouched
        index = torch.arange(n, device=z.device)
        tolerance = torch.finfo(z.dtype).eps ** 0.5
        for bit in range((n - 1).bit_length()):
            support = (index >> bit) & 1 == 1
            tangent = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            tangent = tangent * support.reshape(-1, *[1] * (z.dim() - 1)).to(z.dtype)
            try:
                (product,) = torch.autograd.grad(
                    self.grad, z, grad_outputs=tangent, retain_graph=True, allow_unused=True
                )
            except RuntimeError as error:
                raise self._freed(error) from error
            if product is None:
                return None
            norms = product.detach().reshape(n, -1).norm(dim=1)
            outside = torch.where(support, torch.zeros_like(norms), norms)
            if outside.max() > tolerance * norms.norm():
                return int(outside.argmax()), index[support].tolist()
        return None

    def per_sample_hessians(self) -> Tensor:
        """``d2L/dz_n2`` for every sample, ``[N, C, C]``."""
        n, c = self.outputs.shape[0], self.outputs[0].numel()
        products = self.hessian_product(_unit_columns(self.outputs)).reshape(c, n, c)
        hessians = products.permute(1, 2, 0)  # [N, C, C (column)]
        return (hessians + hessians.transpose(1, 2)) / 2

    def summed_hessian(self) -> Tensor:  # noqa: D102
        return self.per_sample_hessians().sum(0)

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:  # noqa: D102
        if mc_samples:
            raise UnknownLikelihoodError(
                "Monte-Carlo factors need a known likelihood (cross-entropy or MSE); use exact "
                "factors (mc_samples=0) for this loss"
            )
        eigenvalues, eigenvectors = torch.linalg.eigh(self.per_sample_hessians())
        factors = eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(-2)  # [N, C, C]
        return factors.permute(2, 0, 1).reshape(-1, *self.outputs.shape)


def freed_graph_message(name: str) -> str:
    """What to do when ``loss.backward()`` freed the graph a loss's Hessian needs."""
    return (
        f"this loss ({name}) has no closed form in curvgraph, so its Hessian w.r.t. the "
        "outputs is computed with autograd from the loss's graph, which loss.backward() "
        "freed: call loss_hessian(loss, out) or cg.curvature(loss, out) before "
        "loss.backward(), or call loss.backward(retain_graph=True). Closed forms (work in "
        "either order): cross_entropy, mse_loss, binary_cross_entropy_with_logits and "
        "nll_loss of the outputs themselves, reduction 'mean' or 'sum', no weights. "
        "cross_entropy over tokens ([N, T, V] logits read transposed, flattened or sliced) "
        "and with ignored targets also after loss.backward(), from the output gradient it "
        "recorded (if that is this loss's gradient); with label smoothing only before"
    )


def _graph_freed(error: RuntimeError) -> bool:
    """Whether ``error`` is torch's "backward through the graph a second time"."""
    text = str(error)
    return "second time" in text or "already been freed" in text


def _draw(sample, count: int, like: Tensor, generator) -> Tensor:
    """``count`` random tensors shaped like ``like``, ``[count, *like.shape]``, by ``sample``.

    ``sample`` is ``torch.randn`` or ``torch.rand``; dtype and device are ``like``'s.
    """
    return sample(count, *like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _unit_columns(outputs: Tensor) -> Tensor:
    """``C`` columns ``[C, N, *out]``: column ``c`` is the unit vector ``e_c`` in every sample.

    An expanded view (no copy); ``C = outputs[0].numel()``.
    """
    c = outputs[0].numel()
    eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device)
    return eye.reshape(c, 1, *outputs.shape[1:]).expand(c, *outputs.shape)
