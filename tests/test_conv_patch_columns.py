"""``patch_columns`` (the KFC input factor's layout) against ``patches`` (``F.unfold``)."""

from __future__ import annotations

import pytest
import torch

from curvgraph.rules.layers.conv import patch_columns, patches

GEOMETRIES = [  # (input shape, kernel, stride, padding, dilation)
    ((3, 2, 9), (3,), (1,), (0,), (1,)),
    ((2, 3, 10), (4,), (2,), (1,), (2,)),
    ((3, 2, 7, 6), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4, 9, 8), (3, 2), (2, 1), (1, 0), (1, 2)),
    ((2, 2, 5, 6, 5), (2, 3, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1)),
]


@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", GEOMETRIES)
def test_patch_columns_are_the_unfolded_patches(shape, kernel, stride, padding, dilation):
    x = torch.randn(shape, dtype=torch.float64)
    unfolded = patches(x, kernel, stride, padding, dilation, groups=1)[:, 0]  # [N, d, P]
    expected = unfolded.transpose(0, 1).reshape(unfolded.shape[1], -1)  # [d, N P], (n, p)
    assert torch.equal(patch_columns(x, kernel, stride, padding, dilation), expected)
