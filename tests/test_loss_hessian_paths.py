"""``loss_hessian`` of a cross-entropy on logits ``[N, C]``: the direct path and the masked one."""

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import curvgraph
from curvgraph.losses.recognition import _check_targets


def _reference(z, y, reduction, ignore_index=-100):
    def loss(z):
        return F.cross_entropy(z, y, reduction=reduction, ignore_index=ignore_index)

    return torch.einsum("ncnd->cd", torch.func.hessian(loss)(z))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [False, True])
def test_cross_entropy_hessian_equals_torch_func(reduction, ignored):
    torch.manual_seed(0)
    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (12,))
    if ignored:  # the masked path: the ignored samples are left out (and not counted)
        y[[1, 7]] = -100
    loss = F.cross_entropy(z, y, reduction=reduction)
    torch.testing.assert_close(
        curvgraph.loss_hessian(loss, z), _reference(z.detach(), y, reduction)
    )


@pytest.mark.parametrize("bad", [5, -3, 17])
def test_a_target_outside_the_classes_is_refused(bad):
    """torch's CPU forward refuses these itself; the check covers devices that do not."""
    call = SimpleNamespace(target=torch.tensor([0, 1, bad, -100]), ignore_index=-100)
    with pytest.raises(ValueError, match="outside the classes"):
        _check_targets(call, 5)


@pytest.mark.parametrize("targets", [[0, 4, 2], [0, -100, 4], [], [-100]])
def test_class_targets_and_ignored_ones_pass(targets):
    _check_targets(
        SimpleNamespace(target=torch.tensor(targets, dtype=torch.long), ignore_index=-100), 5
    )
