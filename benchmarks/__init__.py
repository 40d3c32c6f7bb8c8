"""curvgraph's benchmark suite (run the scripts with ``python -m benchmarks.<name>``).

- :mod:`benchmarks.timing`: timing, peak-memory and environment helpers shared by all scripts.
- :mod:`benchmarks.foundation`: speed of the gradient, the HBP pass and the CG-Newton step on
  the seed model and an MLP (ratios to a gradient and to SGD, measured in one run).

See ``benchmarks/README.md`` for what each script measures and how to run it.
"""
