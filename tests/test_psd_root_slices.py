"""``psd_root`` keeps the eigenvalues above rounding as a suffix of eigh's ascending order."""

import pytest
import torch

from curvgraph.losses.models import CrossEntropyLoss
from curvgraph.methods.hbp_roots import psd_root


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_deficient_psd_root_has_rank_rows_and_reproduces_the_matrix(rank):
    torch.manual_seed(rank)
    factor = torch.randn(rank, 7, dtype=torch.float64)
    matrix = factor.T @ factor
    root = psd_root(matrix)
    assert root.shape == (rank, 7)
    torch.testing.assert_close(root.T @ root, matrix)


def test_cross_entropy_hessian_root_drops_its_null_direction():
    torch.manual_seed(0)
    hessian = CrossEntropyLoss(torch.randn(40, 10, dtype=torch.float64), 1 / 40).summed_hessian()
    root = psd_root(hessian)
    assert root.shape == (9, 10)  # the constant vector is in its null space
    torch.testing.assert_close(root.T @ root, hessian)


def test_zero_and_indefinite_matrices():
    zero = torch.zeros(4, 4)
    assert torch.equal(psd_root(zero), torch.zeros(1, 4))
    assert psd_root(torch.diag(torch.tensor([1.0, -0.5, 2.0]))) is None
