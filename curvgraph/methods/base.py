"""Methods as registered objects, the curvature vocabulary, and the method registry.

A :class:`Method` turns a traced graph with a recorded forward pass into block curvature. It
declares its name, the curvatures it supports, :meth:`Method.check` (whether it can run on a
graph and why not: what :func:`curvgraph.inspect` prints) and :meth:`Method.run`. Methods
are registered like rules (:func:`register_method`, duplicates refused), and
``cg.curvature(..., method=...)``, ``cg.backward_hessian`` and :func:`curvgraph.inspect`
find them only through the registry. See ``docs/architecture.md``, Methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from torch import Tensor

from curvgraph.curvature import BlockCurvature
from curvgraph.distributed import BatchShard
from curvgraph.graph import Plan, TracedGraph
from curvgraph.losses import LossModel

__all__ = [
    "CURVATURES",
    "FISHERS",
    "STRUCTURES",
    "MODIFY_2ND_ORDER_TERMS",
    "Method",
    "Verdict",
    "lookup_method",
    "mixing_nodes",
    "register_method",
    "registered_methods",
    "resolve_curvature",
    "unregister_method",
]

#: residual modification of each curvature (``None``: residual dropped)
CURVATURES = {"hessian": "none", "ggn": None, "pch-abs": "abs", "pch-clip": "clip"}
#: the Fishers (no residual; the loss Hessian at the output replaced, see
#: :mod:`curvgraph.methods.structures`): computed by methods with ``fisher = True``
FISHERS = {
    "fisher-mc": "J^T S S^T J, S sampled loss roots",
    "fisher-empirical": "(1/c) sum_n J_n^T g_n g_n^T J_n",
}
#: ``structure=`` values: per parameter, per module, one operator over all parameters
STRUCTURES = ("blocks", "layers", "full")
#: the seed's spelling (bpexts ``modify_2nd_order_terms``) -> curvature
MODIFY_2ND_ORDER_TERMS = {
    None: "hessian",
    "none": "hessian",
    "zero": "ggn",
    "abs": "pch-abs",
    "clip": "pch-clip",
}
UNSET = object()


def resolve_curvature(curvature: Optional[str], modify=UNSET) -> str:
    """The curvature name from ``curvature`` or the seed's ``modify_2nd_order_terms``."""
    if modify is not UNSET:
        if modify not in MODIFY_2ND_ORDER_TERMS:
            raise ValueError(
                f"modify_2nd_order_terms={modify!r}; expected one of None, 'zero', 'abs', 'clip'"
            )
        implied = MODIFY_2ND_ORDER_TERMS[modify]
        if curvature is not None and curvature != implied:
            raise ValueError(
                f"curvature={curvature!r} contradicts modify_2nd_order_terms={modify!r} "
                f"(which means {implied!r}); pass one of them"
            )
        return implied
    curvature = "ggn" if curvature is None else curvature
    if curvature not in CURVATURES and curvature not in FISHERS:
        known = sorted(CURVATURES) + sorted(FISHERS)
        raise ValueError(f"curvature={curvature!r}; expected one of {known}")
    return curvature


@dataclass(frozen=True)
class Verdict:
    """Whether a method can run on a graph: ``yes (detail)`` or ``no: reason``."""

    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        if not self.ok:
            return f"no: {self.detail}"
        return f"yes ({self.detail})" if self.detail else "yes"


def mixing_nodes(walk: Plan, graph: TracedGraph) -> List[str]:
    """Names of the needed nodes whose recorded call mixes samples (BatchNorm in training)."""
    contexts = graph.record.contexts.stored  # the flag only: no slimmed context rebuilt
    return [i.node.name for i in walk.order if contexts[i.node.name].mixes_samples]


class Method:
    """A way to compute block curvature; subclasses set the attributes and :meth:`run`.

    Attributes:
        name: the ``method=`` value.
        description: one line for messages and docs.
        curvatures: the curvatures it computes (keys of :data:`CURVATURES`).
        per_sample: it needs calls that treat samples separately (refuses BatchNorm in
            training mode and other ops that mix samples).
        monte_carlo: with its default options the blocks are Monte-Carlo estimates (their
            accuracy grows with ``mc_samples``); otherwise, for one sample, every block
            equals the exact block of its curvature (a diagonal block its diagonal), the
            identity the registry's tests check for every method.
        fisher: it also computes the curvatures of :data:`FISHERS`.
        structures: the ``structure=`` values it computes (:data:`STRUCTURES`); with more
            than ``"blocks"``, :meth:`run` takes ``structure`` and ``parameters`` and
            restricts its walk to the parameters named (others: the dispatch drops the
            blocks not asked for after the walk).
        same_features_on_ranks: with ``process_group``, the ranks' outputs must have the
            same features per sample (HBP sums dense output Hessians over the ranks): the
            features join the call every rank states, so other sizes are refused on all.
        walks_once: :meth:`run` reads each recorded call once, in one reverse walk
            (:meth:`~curvgraph.graph.Plan.reverse`) and never after it: with
            ``retain_record=False`` each call is freed as soon as the walk has passed it
            (else the whole record is freed when the method returns).
    """

    name: str = ""
    description: str = ""
    curvatures: frozenset = frozenset(CURVATURES)
    per_sample: bool = True
    monte_carlo: bool = False
    fisher: bool = False
    structures: frozenset = frozenset({"blocks"})
    same_features_on_ranks: bool = False
    walks_once: bool = False

    def resolve(self, curvature: Optional[str], modify=UNSET) -> str:
        """The curvature to compute; ``ValueError`` if this method does not compute it."""
        curvature = resolve_curvature(curvature, modify)
        if curvature in FISHERS and not self.fisher:
            raise ValueError(
                f"method={self.name!r} does not compute the Fisher {curvature!r}; use "
                "method='exact'"
            )
        if curvature not in self.curvatures and curvature not in FISHERS:
            if self.curvatures == {"ggn"}:
                raise ValueError(f"method={self.name!r} approximates the GGN; pass curvature='ggn'")
            raise ValueError(
                f"method={self.name!r} computes curvature in {sorted(self.curvatures)}, "
                f"not {curvature!r}"
            )
        return curvature

    def check(self, graph: TracedGraph, walk: Plan, **options) -> Verdict:
        """Whether the method can run on ``graph`` (after a forward pass), and why not.

        Args:
            graph: the traced graph with a recorded forward pass.
            walk: its :func:`~curvgraph.graph.plan`.
            **options: method options that change the verdict (``max_features``).
        """
        mixing = mixing_nodes(walk, graph) if self.per_sample else []
        if mixing:
            return Verdict(False, f"node(s) {', '.join(mixing)} mix samples; use exact")
        return self.verdict(graph, walk, **options)

    def verdict(self, graph: TracedGraph, walk: Plan, **options) -> Verdict:
        """The method's own part of :meth:`check` (after the shared sample-mixing check)."""
        return Verdict(True)

    def precheck(self, graph: TracedGraph, **options) -> None:
        """Refuse, before the loss is read, what the method cannot run (default: nothing).

        Called by ``cg.curvature`` first, for cheap refusals that would otherwise come after
        costly or infeasible work (HBP's sizes, before the loss's dense output Hessian).
        """

    def run(
        self,
        graph: TracedGraph,
        loss_model: LossModel,
        curvature: str,
        shard: BatchShard,
        loss: Optional[Tensor] = None,
        **options,
    ) -> BlockCurvature:
        """Compute the blocks.

        Args:
            graph: the traced graph with a recorded forward pass.
            loss_model: the recognised loss (:func:`curvgraph.losses.recognise`).
            curvature: a resolved curvature (:meth:`resolve`).
            shard: the batch and its split over ranks: every reduction over samples goes
                through it (the one place where data parallelism enters a method).
            loss: the loss tensor (gradients for the Hessian and PCH if
                ``loss.backward()`` was not called).
            **options: the method's own options.
        """
        raise NotImplementedError(f"method {self.name!r} has no run()")

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.description}>"


_METHODS: Dict[str, Method] = {}


def register_method(method, override: bool = False) -> Callable:
    """Register a :class:`Method` subclass (as a class decorator) or instance.

    Registering a name that is taken is an error unless ``override=True``.
    """
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method) or not instance.name:
        raise TypeError(f"register_method expects a named Method, got {method!r}")
    if instance.name in _METHODS and not override:
        raise ValueError(f"method {instance.name!r} is already registered")
    _METHODS[instance.name] = instance
    return method


def unregister_method(name: str) -> None:
    """Remove the method registered as ``name`` (used by tests and notebooks)."""
    _METHODS.pop(name, None)


def lookup_method(name: str) -> Method:
    """The method registered as ``name``; ``ValueError`` listing the others if none."""
    if name not in _METHODS:
        raise ValueError(f"method={name!r}; expected one of {sorted(_METHODS)}")
    return _METHODS[name]


def registered_methods() -> Dict[str, Method]:
    """Every registered method by name, in registration order."""
    return dict(_METHODS)
