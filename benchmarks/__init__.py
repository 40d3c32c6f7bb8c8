"""curvgraph's benchmarks.

- ``python -m benchmarks --suite quick|full``: the suite (:mod:`benchmarks.suite`): cost
  against a gradient and the peers (:mod:`benchmarks.cost`), accuracy of the approximations
  (:mod:`benchmarks.accuracy`), convergence of CG-Newton against SGD and Adam
  (:mod:`benchmarks.convergence`) and the seed tutorial's figure.
- ``python -m benchmarks.foundation``: HBP pass / gradient and CG-Newton step / SGD step.
- :mod:`benchmarks.timing`: medians after warm-up, interleaving; with peak memory
  (:mod:`benchmarks.memory`) and the environment and contention (:mod:`benchmarks.machine`).
"""
