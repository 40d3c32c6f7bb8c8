"""The traced graph and its analysis passes: nodes, rules, argument sources, records.

No mathematics: the methods (:mod:`curvgraph.methods`) walk what this layer holds.
"""

from curvgraph.graph.analysis import GraphAnalysis, NodeInfo, Source, analyse
from curvgraph.graph.derived import DerivedParameter
from curvgraph.graph.plan import Plan, gradients, plan, validate_call
from curvgraph.graph.record import Record, Recorder, record_forward
from curvgraph.graph.traced import TracedGraph, capture

__all__ = [
    "DerivedParameter",
    "GraphAnalysis",
    "NodeInfo",
    "Plan",
    "Record",
    "Recorder",
    "Source",
    "TracedGraph",
    "analyse",
    "capture",
    "gradients",
    "plan",
    "record_forward",
    "validate_call",
]
