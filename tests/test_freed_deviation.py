"""``_deviation`` (the check of a freed cross-entropy's recorded gradient) against its formula.

The gradient ``scale (p - e_y)`` of counted rows, zero on ignored ones, plus a known
perturbation: the deviation is that perturbation's largest entry on the counted rows
(float64), along any class axis; ignored rows never count.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from curvgraph.losses.freed import _deviation

DTYPE = torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("axis", [2, 1])
def test_deviation_is_the_largest_perturbation_on_counted_rows(reduction, axis):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=DTYPE)  # classes along ``axis`` after the move below
    y = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    counted = torch.rand(logits.shape[:-1]) > 0.3
    scale = 1.0 if reduction == "sum" else 1.0 / int(counted.sum())
    exact = scale * (torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 7).to(DTYPE))
    noise = 1e-6 * torch.randn(logits.shape, dtype=DTYPE)
    gradient = torch.where(counted.unsqueeze(-1), exact + scale * noise, torch.zeros(()))
    call = SimpleNamespace(reduction=reduction)  # all _deviation reads of the LossCall
    error, found, found_scale = _deviation(
        call, logits.movedim(-1, axis), gradient.movedim(-1, axis), axis
    )
    assert torch.equal(found, counted) and found_scale == pytest.approx(scale, rel=1e-15)
    expected = float(noise[counted].abs().amax())
    assert error == pytest.approx(expected, rel=1e-6)
