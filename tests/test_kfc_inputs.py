"""``patch_rows`` and ``channel_major`` (the KFC input factor's layout) against ``patches``.

``patches`` is ``F.unfold`` (2-D) or ``Tensor.unfold`` (1-D, 3-D), channel-major; the rows
are kernel-major, so their Gram re-indexed by ``channel_major`` must be the unfolded
patches' Gram, and the rows themselves the unfolded patches with columns permuted.
"""

from __future__ import annotations

import math

import pytest
import torch

from curvgraph.rules.layers.conv import patches
from curvgraph.rules.layers.kfc_inputs import channel_major, patch_rows

GEOMETRIES = [  # (input shape, kernel, stride, padding, dilation)
    ((3, 2, 9), (3,), (1,), (0,), (1,)),
    ((2, 3, 10), (4,), (2,), (1,), (2,)),
    ((3, 2, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4, 9, 8), (3, 2), (2, 1), (1, 0), (1, 2)),
    ((2, 2, 5, 6, 5), (2, 3, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", GEOMETRIES)
def test_patch_rows_are_the_unfolded_patches(shape, kernel, stride, padding, dilation):
    x = torch.randn(shape, dtype=torch.float64)
    unfolded = patches(x, kernel, stride, padding, dilation, groups=1)[:, 0]  # [N, d, P]
    columns = unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1)  # [d, N P], (c, k)
    rows = patch_rows(x, kernel, stride, padding, dilation)  # [N P, d], (k, c)
    channels, offsets = shape[1], math.prod(kernel)
    kernel_major = columns.reshape(channels, offsets, -1).transpose(0, 1).reshape(rows.shape[1], -1)
    assert torch.equal(rows, kernel_major.T)
    torch.testing.assert_close(
        channel_major(rows.T @ rows, channels), columns @ columns.T, rtol=1e-13, atol=1e-12
    )


def test_channel_major_reindexes_both_sides():
    factor = torch.arange(36.0).reshape(6, 6)  # offsets 3, channels 2: index j * 2 + c
    order = [0, 2, 4, 1, 3, 5]  # channel-major position c * 3 + j holds index j * 2 + c
    assert torch.equal(channel_major(factor, 2), factor[order][:, order])
