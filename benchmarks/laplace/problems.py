"""The section's problems and backends: what one ``Laplace.fit`` of a candidate is.

A candidate is ``(problem, structure, backend)``: ``Laplace(model, "classification",
subset_of_weights="all", hessian_structure=structure, backend=...)`` fitted on ``samples``
training examples in batches of ``batch`` (float32). :func:`fit` builds the Laplace object
(untimed) and returns the call that fits it, with the curvature calls' own time recorded
beside the whole fit (a Kronecker fit ends with laplace-torch's eigendecompositions of the
factors, the same work for every backend).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["BACKENDS", "PROBLEMS", "STRUCTURES", "backend_class", "fit", "loader", "model"]

#: the problems: name -> (title, batch size)
PROBLEMS = {
    "mnist_mlp": ("MLP 784-1000-500-100-10, ReLU (DeepOBS mnist_mlp), MNIST subset", 50),
    "resnet18": ("torchvision resnet18 (BatchNorm, eval), 10 classes, random 3x32x32", 50),
}
STRUCTURES = ("kron", "diag")
#: backend names in report order: curvgraph first, then laplace-torch's own
BACKENDS = ("CurvgraphGGN", "AsdlGGN", "BackPackGGN", "CurvlinopsGGN")


def backend_class(name: str):
    """The backend class of ``name`` (laplace-torch's or curvgraph's)."""
    if name == "CurvgraphGGN":
        from curvgraph.integrations.laplace import CurvgraphGGN

        return CurvgraphGGN
    import laplace.curvature

    return getattr(laplace.curvature, name)


def model(problem: str) -> nn.Module:
    """The problem's model after ``torch.manual_seed(0)``, float32, in eval mode."""
    torch.manual_seed(0)
    if problem == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10).eval()
    from benchmarks.problems import get

    return get(problem).model().eval()


def loader(problem: str, samples: int) -> Tuple[DataLoader, str]:
    """The first ``samples`` examples in batches of the problem's size, and what data it is."""
    batch = min(samples, PROBLEMS[problem][1])
    if problem == "resnet18":
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(samples, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (samples,), generator=generator)
        data = "synthetic (uniform pixels, uniform labels)"
    else:
        from benchmarks.problems import get

        x, y = get(problem).batch(samples)
        data = "MNIST subset (real)"
    return DataLoader(TensorDataset(x, y), batch_size=batch), data


def fit(problem: str, structure: str, backend: str, samples: int) -> Tuple[Callable, Dict]:
    """``(fn, record)``: ``fn()`` builds a fresh Laplace object and fits it.

    ``record`` then holds ``curvature_s`` (the backend's calls) and ``diagonal`` (the fitted
    curvature's diagonal).
    """
    from laplace import Laplace

    data, _ = loader(problem, samples)
    cls, base = backend_class(backend), model(problem)
    record: Dict = {}

    def run():
        copied = copy.deepcopy(base)  # BackPACK and ASDL change the modules they are given
        la = Laplace(copied, "classification", "all", hessian_structure=structure, backend=cls)
        closure, spent = la._curv_closure, [0.0]

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = closure(*args, **kwargs)
            spent[0] += time.perf_counter() - start
            return result

        la._curv_closure = timed
        la.fit(data)
        record["curvature_s"] = spent[0]
        record["diagonal"] = la.H_facs.diag() if structure == "kron" else la.H
        return la

    return run, record
