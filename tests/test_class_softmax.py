"""``class_softmax``: the cross-entropy's probabilities, whichever kernel computes them."""

import pytest
import torch

from curvgraph.losses.models import CrossEntropyLoss, class_softmax


@pytest.mark.parametrize("shape", [(500, 10), (7, 1), (33, 16), (9, 17), (4, 300)])
def test_class_softmax_equals_the_float64_softmax(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape) * 4
    reference = torch.softmax(logits.double(), dim=1)
    p = class_softmax(logits)
    assert p.shape == logits.shape and p.dtype == logits.dtype
    torch.testing.assert_close(p.double(), reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(class_softmax(logits.double()), reference, rtol=1e-13, atol=0)


def test_class_softmax_of_a_transposed_view():
    logits = torch.randn(10, 40).T  # [40, 10], not contiguous
    torch.testing.assert_close(
        class_softmax(logits).double(), torch.softmax(logits.double(), 1), rtol=1e-6, atol=1e-7
    )


def test_cross_entropy_hessian_with_few_classes_equals_torch_func():
    torch.manual_seed(1)
    z = torch.randn(50, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (50,))

    def loss(z):
        return torch.nn.functional.cross_entropy(z, y, reduction="sum")

    hessian = torch.func.hessian(loss)(z)  # [N, C, N, C], block diagonal over samples
    summed = torch.einsum("ncnd->cd", hessian)
    torch.testing.assert_close(CrossEntropyLoss(z, 1.0).summed_hessian(), summed)
