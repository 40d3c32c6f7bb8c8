"""Runnable examples: ``python -m curvgraph.examples.<name>``."""
