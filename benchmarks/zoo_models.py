"""The torchvision models of the zoo (:mod:`benchmarks.zoo`): built, sized, calibrated.

- :func:`build`: a torchvision classification model by name, random weights, eval mode (on the
  ``meta`` device for its structure alone);
- :func:`input_size`: the smallest of :data:`SIZES` (or given sizes) that a model accepts;
- :func:`calibrate_batch_norm`: BatchNorm running statistics set to those of a batch, so that
  deep networks keep realistic activations in eval mode (see its docstring);
- :func:`models_by_size`: the models to run, smallest first (:func:`parameter_count`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SIZES",
    "build",
    "calibrate_batch_norm",
    "input_size",
    "models_by_size",
    "parameter_count",
]

SIZES = (64, 224, 299)  # input sizes tried, smallest first


def build(name: str, device: str = "cpu") -> nn.Module:
    """The torchvision model ``name`` (random weights, eval mode) on ``device``."""
    import torchvision

    torch.manual_seed(0)
    with torch.device(device):
        model = torchvision.models.get_model(name, weights=None)
    return model.eval()


def input_size(model: nn.Module, sizes: Sequence[int] = SIZES) -> Optional[int]:
    """The smallest of ``sizes`` that the model accepts (``None`` if none)."""
    for size in sizes:
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
            return size
        except Exception:  # noqa: BLE001 - too small for this architecture
            continue
    return None


def calibrate_batch_norm(model: nn.Module, x: Tensor) -> None:
    """Running statistics of every BatchNorm layer := those of its input in ``model(x)``.

    One eval-mode forward in which each BatchNorm, just before it runs, sets ``running_mean``
    and ``running_var`` to the mean and biased variance of its input over all axes but the
    channels: every layer then sees the activations of the calibrated layers before it, and
    ``model(x)`` in eval mode normalises every BatchNorm input exactly. (Running statistics
    from a training-mode forward are not enough: with few values per channel, the unbiased
    variance and channels of near-zero variance, amplified up to ``1/sqrt(eps)``, make the
    eval-mode activations drift from the training-mode ones layer after layer;
    efficientnet_v2_l's logits still saturated the softmax that way.)

    Args:
        model: The model, in eval mode; its BatchNorm buffers are overwritten.
        x: The batch whose activations give the statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]  # the others normalise by the batch

    def set_statistics(norm: nn.Module, args) -> None:
        dims = [d for d in range(args[0].dim()) if d != 1]  # all but the channel axis
        norm.running_mean.copy_(args[0].mean(dims))
        norm.running_var.copy_(args[0].var(dims, correction=0))

    handles = [norm.register_forward_pre_hook(set_statistics) for norm in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()


def parameter_count(name: str) -> int:
    """Parameter count of model ``name`` (built on the meta device: no memory).

    Builders that compute on tensors (and so fail on the meta device) count as ``10**12``, so
    that they sort last.
    """
    try:
        return sum(p.numel() for p in build(name, "meta").parameters())
    except Exception:  # noqa: BLE001 - builders that compute on tensors: last
        return 10**12


def models_by_size(names: Optional[Sequence[str]] = None) -> List[str]:
    """``names`` (default: every torchvision classification model), smallest first."""
    import torchvision

    names = names or torchvision.models.list_models(module=torchvision.models)
    return sorted(names, key=parameter_count)
