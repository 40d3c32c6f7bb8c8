"""The checks of a curvature call that can fail on one rank, agreed on by every rank.

With a ``process_group``, a check that fails on one rank only (an empty shard, NaN outputs,
a non-finite loss, a loss that couples samples, another model) must fail on every rank: a
rank that raised alone would leave the others waiting in the call's first collective. So
the checks run first, on every rank, with their errors caught; then each rank states the
outcome with fingerprints of its call and graph and checksums of its parameters and
derived tensors (:class:`~curvgraph.distributed.RankState`) in one ``all_gather``, and
every rank raises the same :class:`~curvgraph.distributed.RankError` if one failed or
differs. Without a process group the checks raise as they are. ::

    with RankAgreement(graph, outputs, group, "mean", {"method": method}) as ranks:
        loss_model = recognise(loss, outputs)  # may raise on one rank
        ranks.loss(loss_model)
    blocks = run(..., ranks.shard)  # collectives from here on
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch
import torch.fx
from torch import Tensor

from curvgraph.distributed import BatchShard
from curvgraph.errors import CurvGraphError
from curvgraph.graph import TracedGraph
from curvgraph.losses import CrossEntropyLoss, LossStructureError, MSELoss, TokenCrossEntropyLoss
from curvgraph.methods.pullback import check_distributed
from curvgraph.rank_state import CAUSES, RankState, fingerprint

__all__ = ["RankAgreement", "checksum", "derived_checksum", "loss_count"]

#: entries of a tensor converted to float64 at a time by :func:`checksum`
CHECKSUM_CHUNK = 1 << 22


class RankAgreement:
    """A context whose body runs the checks of one call; on exit, every rank agrees.

    Args:
        graph: the traced model, after a forward pass.
        outputs: this rank's model output ``[N_r, *]`` (``None``: the last forward's).
        process_group: the ``torch.distributed`` group, or ``None`` (one process: the
            body's errors propagate unchanged).
        loss_reduction: ``"mean"`` or ``"sum"`` (each rank's loss over its samples).
        call: what the call asks for (method, curvature, options): fingerprinted, so
            ranks making other calls are refused.

    Attributes:
        shard: the :class:`~curvgraph.distributed.BatchShard` after the body (the agreed
            batch split).
    """

    def __init__(
        self, graph: TracedGraph, outputs: Tensor, process_group, loss_reduction="mean", call=None
    ):
        self.graph, self.outputs, self.group = graph, outputs, process_group
        self.loss_reduction = loss_reduction
        self.call = {**(call or {}), "loss_reduction": loss_reduction}
        self.counted = -1
        self.failure: Optional[Tuple[str, BaseException]] = None
        self.shard: Optional[BatchShard] = None

    def __enter__(self) -> RankAgreement:
        """Check this rank's batch: not empty, finite outputs (a failure is kept, not raised)."""
        if self.group is None:
            return self
        outputs = self._outputs()
        if outputs is None:
            return self  # no forward or no tensor output: the body's checks say so
        outputs = outputs.detach()
        if outputs.shape[0] == 0:
            message = f"its outputs have shape {tuple(outputs.shape)}: 0 samples"
            self.failure = (CAUSES[0], CurvGraphError(message))
        elif not torch.isfinite(outputs).all():
            bad = int((~torch.isfinite(outputs)).sum())
            message = f"{bad} of the {outputs.numel()} entries of its outputs are NaN or inf"
            self.failure = (CAUSES[1], FloatingPointError(message))
        return self

    def loss(self, loss_model) -> None:
        """Refuse a loss whose reduction contradicts ``loss_reduction`` (with ranks only)."""
        if self.group is not None:
            self.counted = loss_count(loss_model, self.loss_reduction)

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt and the like: no agreement
        if self.group is None:
            if error is None:
                outputs = self._outputs()
                self.shard = BatchShard(None, outputs.shape[0], outputs, self.loss_reduction)
            return False
        if self.failure is None and error is not None:
            self.failure = (_cause(error), error)
        outputs = self._outputs()
        if outputs is None:  # a failure on this rank: only the device of the collective counts
            parameter = next(self.graph.model.parameters(), None)
            outputs = torch.zeros(0) if parameter is None else parameter.new_zeros(0)
        self.shard = BatchShard(
            self.group, outputs.shape[0], outputs, self.loss_reduction, self._state(outputs)
        )  # raises the agreed RankError on every rank if a rank failed or differs
        check_distributed(self.graph, self.shard)
        return False

    def _outputs(self) -> Optional[Tensor]:
        """The outputs given, else the last forward's tensor output (``None``: none)."""
        if self.outputs is not None:
            return self.outputs
        try:
            result = self.graph.record.result
        except CurvGraphError:  # no forward yet: the body's checks say so
            return None
        return result if isinstance(result, Tensor) and result.dim() > 0 else None

    def _state(self, outputs: Tensor) -> RankState:
        """This rank's statement: the failure, the fingerprints and the checksums."""
        state = RankState(outputs.shape[0], self.failure, counted=self.counted)
        try:
            state.call = fingerprint(sorted((k, _spelling(v)) for k, v in self.call.items()))
            module = self.graph.graph_module
            nodes = [_node(module, n) for n in module.graph.nodes]
            state.graph = (fingerprint(nodes), len(nodes))
            device = outputs.device
            state.parameters = checksum((p for _, p in self.graph.model.named_parameters()), device)
            state.derived = derived_checksum(self.graph, device)
        except Exception as error:  # noqa: BLE001 (any error here must be agreed on too)
            if state.failure is None:
                state.failure = (CAUSES[-1], error)
        return state


def loss_count(loss_model, loss_reduction: str) -> int:
    """Refuse a recognised loss whose reduction contradicts ``loss_reduction``.

    Returns:
        The tokens ``M_r`` a mean over counted tokens
        (:class:`~curvgraph.losses.TokenCrossEntropyLoss`) divides by, ``-1`` for other
        losses. Such a loss combines with ``w_r = M_r / M``, since
        ``L = (1/M) sum_r M_r L_r``.
    """
    if isinstance(loss_model, TokenCrossEntropyLoss):
        counted = int(loss_model.counted.sum())
        _check_reduction(loss_model.scale, counted, loss_reduction)
        return counted
    if isinstance(loss_model, CrossEntropyLoss):
        _check_reduction(loss_model.scale, loss_model.p.shape[0], loss_reduction)
    elif isinstance(loss_model, MSELoss):
        _check_reduction(loss_model.scale, loss_model.outputs.numel(), loss_reduction)
    return -1  # a loss seen through autograd: trust loss_reduction


def _check_reduction(scale: float, count: int, loss_reduction: str) -> None:
    """Refuse a loss whose reduction contradicts ``loss_reduction``.

    ``scale`` is the loss's factor over its ``count`` terms: ``1 / count`` a mean, ``1`` a sum.
    """
    mean = count > 0 and math.isclose(scale, 1.0 / count)
    total = math.isclose(scale, 1.0)
    if (loss_reduction == "mean" and not mean) or (loss_reduction == "sum" and not total):
        actual = "sum" if total else "mean"
        raise ValueError(
            f"the loss uses reduction={actual!r} but loss_reduction={loss_reduction!r}; "
            f"pass loss_reduction={actual!r} so that the ranks' losses combine correctly"
        )


def checksum(tensors: Iterable[Tensor], device) -> Tensor:
    """``[sum_i numel_i, sum_i S_i, sum_i Q_i, sum_i (i + 1) P_i]`` of tensors ``t_i`` (float64).

    ``S = sum_j t_j``, ``Q = sum_j t_j^2`` and ``P = sum_j t_j t_{j+1}`` (entries flattened):
    equal tensors give equal checksums (up to the rounding of the sums); other values, a
    swap of two tensors or of two entries change them. Computed where the tensors are.
    """
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for i, tensor in enumerate(tensors):
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), CHECKSUM_CHUNK):  # float64 copies of a chunk only
            part = flat[start : start + CHECKSUM_CHUNK + 1].to(torch.float64)  # + the next entry
            own = part[:CHECKSUM_CHUNK]
            summary = torch.stack(
                [own.new_tensor(float(own.numel())), own.sum(), torch.dot(own, own),
                 (i + 1) * torch.dot(part[:-1], part[1:])]
            )  # fmt: skip
            total = total + summary.to(device)
    return total


def derived_checksum(graph: TracedGraph, device) -> Optional[Tensor]:
    """A checksum of the derived tensors' last recorded values (``None`` without any)."""
    if not graph.derived:
        return None
    outputs = graph.record.outputs
    values = [outputs[n] for n in sorted(graph.derived) if outputs.get(n) is not None]
    return checksum(values, device)


def _cause(error: BaseException) -> str:
    """The :data:`~curvgraph.distributed.CAUSES` entry of an error of a check."""
    if isinstance(error, FloatingPointError):
        return CAUSES[2]
    if isinstance(error, LossStructureError):
        return CAUSES[3]
    return CAUSES[-1]


def _node(module: torch.fx.GraphModule, node: torch.fx.Node) -> Tuple[str, ...]:
    """A node as the fingerprint reads it: its op, name and target (a module's class too)."""
    target = _spelling(node.target)
    if node.op == "call_module":
        target += f" {type(module.get_submodule(node.target)).__qualname__}"
    return node.op, node.name, target


def _spelling(value) -> str:
    """A spelling of an option or op target that is the same in every process (no addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_spelling(v) for v in value) + ")"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if type(value).__name__.startswith("OpOverload"):
        return str(value)
    return type(value).__qualname__
