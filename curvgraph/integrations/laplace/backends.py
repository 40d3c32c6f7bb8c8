"""laplace-torch curvature backends computed by curvgraph.

laplace-torch (``Laplace(model, likelihood, ..., backend=...)``) asks its backend for the
curvature of the negative log likelihood of a batch, ``loss = factor * lossfunc(f, y)``
with ``lossfunc`` the *summed* cross-entropy (``factor = 1``) or summed MSE
(``factor = 1/2``, a unit-variance Gaussian), in three structures
(:class:`laplace.curvature.CurvatureInterface`): ``full(x, y)`` (``P x P``), ``kron(x, y,
N)`` (:class:`laplace.utils.Kron`, input factors scaled by ``M / N`` for a batch of ``M`` of
``N`` samples) and ``diag(x, y)``, each returned as ``(loss, curvature)``. The backends here
trace the model once with :func:`curvgraph.trace` (fx, or ``torch.export`` where fx cannot:
Hugging Face models, dict inputs) and compute:

- :class:`CurvgraphGGN`: the GGN ``sum_n J_n^T (d2 l_n / df_n2) J_n`` (``stochastic=True``:
  the Monte-Carlo Fisher with ``num_samples`` sampled labels per sample, unbiased); ``full``
  from the full-network operator (``method="exact"``, ``structure="full"``, curvature
  ``"ggn"`` or ``"fisher-mc"``), ``kron`` from KFLR / KFAC (``method="kflr" | "kfac"``),
  ``diag`` from ``method="diag"``;
- :class:`CurvgraphEF`: the empirical Fisher ``sum_n J_n^T g_n g_n^T J_n``,
  ``g_n = d lossfunc / d f_n``: ``full`` from the operator's ``"fisher-empirical"``;
  ``kron`` and ``diag`` (the factor methods compute the GGN only) as the GGN of the
  per-sample loss ``(g_n^T f_n)^2 / 2`` with ``g_n`` held fixed, whose Hessian is
  ``g_n g_n^T``;
- :class:`CurvgraphHessian`: the Hessian, ``full`` from the operator and ``diag`` from exact
  block products; it has no Kronecker factors: ``kron`` refuses with ``NotImplementedError``.

Last-layer Laplace traces the last layer alone on the features (the block of the last
layer depends on nothing else); a subnetwork takes the entries ``subnetwork_indices`` of
``full`` and ``diag``. Jacobians for the GLM predictive are laplace-torch's own
(``torch.func``, :meth:`CurvatureInterface.jacobians`).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor, nn

import curvgraph
from curvgraph.integrations.laplace.conversion import (
    KRON_FALLBACKS,
    dense_full,
    flat_diagonal,
    kronecker_factors,
    parameters_holding,
)

__all__ = ["CurvgraphEF", "CurvgraphGGN", "CurvgraphHessian", "CurvgraphInterface"]


class CurvgraphInterface(CurvatureInterface):
    """The shared part of the curvgraph backends: tracing, the batch loss, the conversions.

    Args:
        model: the model (a laplace-torch ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: only the last layer's curvature (set by laplace-torch).
        subnetwork_indices: entries of the flattened parameters (subnetwork Laplace).
        dict_key_x: key of the inputs in a dict batch (Hugging Face models).
        dict_key_y: key of the targets in a dict batch.
        capture: how :func:`curvgraph.trace` captures the model (``"auto" | "fx" |
            "export"``).
        fallback: rules derived with ``torch.func`` for ops without one.
        output: the part of the model's output that is the logits (``"logits"``), as
            :func:`curvgraph.trace` takes it.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weights shared over positions
            (``kron`` only; docs/methods.md).
        kron_fallback: what ``kron`` does with a matrix parameter without Kronecker factors
            (:func:`~curvgraph.integrations.laplace.conversion.kronecker_factors`).
    """

    #: the curvature curvgraph is asked for (of :meth:`_curvature_loss`)
    curvature_name = "ggn"

    @property
    def full_curvature(self) -> str:
        """The curvature of the full operator: ``"ggn"``, ``"fisher-mc"``, ... of the loss."""
        return "fisher-mc" if getattr(self, "stochastic", False) else self.curvature_name

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Optional[torch.LongTensor] = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        capture: str = "auto",
        fallback: bool = False,
        output: Any = None,
        kfac_approx: str = "expand",
        kron_fallback: str = "diagonal",
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        if kron_fallback not in KRON_FALLBACKS:
            raise ValueError(
                f"kron_fallback must be one of {KRON_FALLBACKS}, got {kron_fallback!r}"
            )
        self.trace_options = {"capture": capture, "fallback": fallback, "output": output}
        self.kfac_approx = kfac_approx
        self.kron_fallback = kron_fallback
        self._graph: Optional[curvgraph.CurvGraph] = None

    def jacobians(self, x, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """laplace-torch's Jacobians (``torch.func``); logits ``[B, T, C]`` as ``B T`` rows.

        The GLM predictive of a sequence model is then one predictive per token (row
        ``n T + t``), the shapes laplace-torch's predictive takes (``[rows, C, P]``).
        """
        jacobians, outputs = super().jacobians(x, enable_backprop)
        if outputs.ndim == 3:
            return jacobians.flatten(0, 1), outputs.flatten(0, 1)
        return jacobians, outputs

    functorch_jacobians = jacobians

    def last_layer_jacobians(self, x, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians of a linear last layer ``f = W phi + b``: ``e_c phi^T`` and ``e_c``.

        As laplace-torch's, with features ``[B, T, D]`` (logits ``[B, T, C]``) as ``B T`` rows.
        """
        outputs, features = self.model.forward_with_features(x)
        if outputs.ndim == 3:
            outputs, features = outputs.flatten(0, 1), features.flatten(0, 1)
        rows, classes = features.shape[0], outputs.shape[-1]
        identity = torch.eye(classes, device=features.device, dtype=features.dtype)
        identity = identity.expand(rows, classes, classes)
        jacobians = torch.einsum("kp,kij->kijp", features, identity).reshape(rows, classes, -1)
        if self.model.last_layer.bias is not None:
            jacobians = torch.cat([jacobians, identity], dim=2)
        if enable_backprop:
            return jacobians, outputs
        return jacobians.detach(), outputs.detach()

    def full(self, x, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(loss, C)``: the ``P x P`` curvature (subnetwork: ``S x S``), cross terms included.

        From curvgraph's full-network operator (``method="exact"``, ``structure="full"``,
        restricted to the parameters a subnetwork touches), ``D`` products.
        """
        names = parameters_holding(self.params_dict, self.subnetwork_indices)
        options = dict(self._sample_options(), structure="full", parameters=names)
        loss, operator = self._curvature(x, y, "exact", self.full_curvature, **options)
        matrix = dense_full(operator, self.params_dict, self.subnetwork_indices)
        return loss, self.factor * matrix

    def diag(self, x, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(loss, diag C)`` over the flattened parameters (subnetwork: its entries)."""
        loss, curvature = self._curvature(x, y, "diag", **self._sample_options())
        diagonal = flat_diagonal(curvature, self.params_dict)
        if self.subnetwork_indices is not None:
            diagonal = diagonal[self.subnetwork_indices]
        return loss, _scaled(diagonal, self.factor)

    def kron(self, x, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """``(loss, Kron)``: per parameter ``[Q, H]`` (``C_p = Q (x) H``) or ``[C_p]``.

        Args:
            x: the batch's inputs (``M`` samples).
            y: its targets.
            N: the data set's size; input factors are scaled by ``M / N``.
            **kwargs: ``kfac_approx`` overrides the backend's.
        """
        if self.subnetwork_indices is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: a subnetwork has no Kronecker structure; "
                "subnetwork Laplace takes hessian_structure='full' or 'diag'"
            )
        method = "kfac" if getattr(self, "stochastic", False) else "kflr"
        approx = kwargs.get("kfac_approx", self.kfac_approx)
        options = self._sample_options() if method == "kfac" else {}
        loss, curvature = self._curvature(x, y, method, kfac_approx=approx, **options)
        factors = kronecker_factors(
            curvature, self.params_dict, self._batch_size(x) / N, self.factor, self.kron_fallback
        )
        return loss, Kron(factors)

    def _sample_options(self) -> dict:
        """Monte-Carlo columns for the stochastic Fisher, exact factors otherwise."""
        if getattr(self, "stochastic", False):
            return {"mc_samples": self.num_samples}
        return {}

    def _curvature(self, x, y: Tensor, method: str, curvature: Optional[str] = None, **options):
        """``(factor * lossfunc(f, y), result)`` of the batch: ``cg.curvature(...)``.

        ``curvature`` names a curvature of the real loss (the full operators' Fishers); without
        it, :attr:`curvature_name` of :meth:`_curvature_loss`.
        """
        with torch.enable_grad():
            graph, out = self._forward(x)
            loss = self._batch_loss(out, y)
            target = loss if curvature is not None else self._curvature_loss(out, loss)
            result = graph.curvature(
                target, out, curvature=curvature or self.curvature_name, method=method, **options
            )
        return self.factor * loss.detach(), result

    def _forward(self, x):
        """The traced graph and its output: the model's, or the last layer's on features."""
        if self.last_layer:
            with torch.no_grad():
                _, features = self.model.forward_with_features(x)
            graph = self._traced(self._model, features)
            return graph, graph(features)
        if isinstance(x, MutableMapping):  # a BatchEncoding or UserDict: a dict for torch.export
            x = dict(x)
        graph = self._traced(self.model, x)
        return graph, graph(x)

    def _traced(self, module: nn.Module, example) -> curvgraph.CurvGraph:
        """``curvgraph.trace(module, example)``, once (the example serves ``torch.export``)."""
        if self._graph is None or self._graph.model is not module:
            self._graph = curvgraph.trace(module, example, **self.trace_options)
        return self._graph

    def _batch_loss(self, out: Tensor, y: Tensor) -> Tensor:
        """``lossfunc(f, y)``: summed MSE, or summed cross-entropy over ``[..., C]`` logits."""
        if self.likelihood == "regression":
            return F.mse_loss(out, y, reduction="sum")
        if out.ndim == 2:
            return F.cross_entropy(out, y, reduction="sum")
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")

    def _curvature_loss(self, out: Tensor, loss: Tensor) -> Tensor:
        """The loss whose ``curvature_name`` curvgraph computes (the batch loss itself)."""
        return loss

    def _batch_size(self, x) -> int:
        inputs = x[self.dict_key_x] if isinstance(x, MutableMapping) else x
        return inputs.shape[0]


class CurvgraphGGN(CurvgraphInterface, GGNInterface):
    """The GGN (``stochastic=True``: the Monte-Carlo Fisher) computed by curvgraph.

    Args:
        stochastic: sample ``num_samples`` labels per sample from the model's predictive
            (the Fisher, unbiased) instead of exact loss-Hessian factors.
        num_samples: Monte-Carlo labels per sample.
        **options: :class:`CurvgraphInterface`'s (``capture``, ``output``, ``kfac_approx``,
            ...), after laplace-torch's own arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Optional[torch.LongTensor] = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        **options,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, **options
        )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.stochastic = stochastic
        self.num_samples = num_samples


class CurvgraphEF(CurvgraphInterface, EFInterface):
    """The empirical Fisher ``sum_n J_n^T g_n g_n^T J_n`` computed by curvgraph."""

    full_curvature = "fisher-empirical"

    def _curvature_loss(self, out: Tensor, loss: Tensor) -> Tensor:
        """``sum_n (g_n^T f_n)^2 / 2`` with ``g_n = d loss / d f_n`` fixed: its GGN is the EF."""
        (gradient,) = torch.autograd.grad(loss, out, retain_graph=True)
        return 0.5 * ((out * gradient.detach()).flatten(1).sum(1) ** 2).sum()


class CurvgraphHessian(CurvgraphInterface):
    """The Hessian of the negative log likelihood: ``full`` and ``diag``, no ``kron``."""

    curvature_name = "hessian"

    def diag(self, x, y: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """``(loss, diag H)`` from exact block products (one tangent column per entry)."""
        names = parameters_holding(self.params_dict, self.subnetwork_indices)
        loss, curvature = self._curvature(x, y, "exact", parameters=names)
        diagonal = flat_diagonal(curvature, self.params_dict)
        if self.subnetwork_indices is not None:
            diagonal = diagonal[self.subnetwork_indices]
        return loss, _scaled(diagonal, self.factor)

    def kron(self, x, y: Tensor, N: int, **kwargs) -> tuple[Tensor, Kron]:
        """Refused: Kronecker factors (KFLR, KFAC) approximate the GGN, not the Hessian."""
        raise NotImplementedError(
            "CurvgraphHessian: hessian_structure='kron' is not defined: Kronecker factors "
            "(KFLR, KFAC) approximate the GGN, not the Hessian; use backend=CurvgraphGGN for "
            "'kron', or hessian_structure='full' or 'diag'"
        )


def _scaled(fresh: Tensor, factor: float) -> Tensor:
    """``factor * fresh``; ``fresh`` itself (a tensor no one else holds) for a factor of one."""
    return fresh if factor == 1 else factor * fresh
