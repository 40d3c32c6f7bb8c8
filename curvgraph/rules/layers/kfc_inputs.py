"""A convolution's KFC input factor from its patches (Grosse & Martens, 2016).

``A = (1/(N P)) sum_{n,p} x_np x_np^T`` over the ``P`` patches ``x_np`` of each sample,
indexed ``(c, kernel offsets)`` as the weight's ``[O, C * prod(kernel)]`` rows. The patches
are copied once as rows ``[N P, prod(kernel) C]`` from the channels-last input
(:func:`patch_rows`), their Gram taken over the block upper triangle and re-indexed
channel-major (:func:`channel_major`): the copy's contiguous runs are ``kernel[-1] * C``
values instead of one output row (3c3d at ``N = 128``, its three input factors: 212 ->
196 ms on one loaded CPU thread against channel-major columns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["channel_major", "patch_rows"]


def patch_rows(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """The patches of ``x`` ``[N, C, *S]`` as rows ``[N * P, prod(kernel) * C]``.

    Row ``(n, p)``, column ``(kernel offsets, c)`` (kernel-major, unlike :func:`patches`):
    one copy through a strided view of the channels-last (padded) input, whose contiguous
    runs are ``kernel[-1] * C`` values.
    """
    dims = len(kernel)
    last = x.movedim(1, -1)  # [N, *S, C]
    pads = [0, 0] + [p for axis in reversed(padding) for p in (axis, axis)]
    last = F.pad(last, pads) if any(pads) else last.contiguous()
    sizes = [
        (last.shape[1 + a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1
        for a in range(dims)
    ]
    steps = last.stride()
    view = last.as_strided(
        (x.shape[0], *sizes, *kernel, x.shape[1]),
        (
            steps[0],
            *(steps[1 + a] * stride[a] for a in range(dims)),
            *(steps[1 + a] * dilation[a] for a in range(dims)),
            steps[-1],
        ),
        last.storage_offset(),
    )
    return view.reshape(x.shape[0] * math.prod(sizes), math.prod(kernel) * x.shape[1])


def channel_major(factor: Tensor, channels: int) -> Tensor:
    """A ``[d, d]`` matrix over kernel-major ``(offsets, c)`` indices, re-indexed channel-major."""
    offsets = factor.shape[0] // channels
    order = torch.arange(factor.shape[0], device=factor.device)
    order = order.reshape(offsets, channels).T.reshape(-1)
    return factor[order][:, order]
