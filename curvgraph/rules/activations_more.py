"""More elementwise activations: hard (piecewise-linear) ones, SELU/CELU, Mish and shrinkages.

Each is ``y = phi(x)`` with closed-form ``phi'`` and ``phi''``. Piecewise-linear ones
(``hardtanh``, ``relu6``, ``hardsigmoid``, the shrinkages, ``threshold``) have ``phi'' = 0``
away from their kinks; at a kink ``phi'`` takes the one-sided value autograd uses. Every
canonical signature names its options like the ``nn`` module attributes (``min_val``,
``alpha``, ``lambd``, ...), so module spellings bind them by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import ElementwiseRule, elementwise_rule
from curvgraph.rules.registry import Sample, alias, randn, register_rule

alias(nn.Hardtanh, F.hardtanh, F.hardtanh_)
alias(nn.ReLU6, F.relu6)
alias(nn.Hardswish, F.hardswish)
alias(nn.Hardsigmoid, F.hardsigmoid)
alias(nn.Mish, F.mish)
alias(nn.SELU, F.selu, F.selu_, torch.selu, torch.selu_)
alias(nn.CELU, F.celu, F.celu_, torch.celu, torch.celu_)
alias(nn.Softsign, F.softsign)
alias(nn.Tanhshrink, F.tanhshrink)
alias(nn.LogSigmoid, F.logsigmoid)
alias(nn.Hardshrink, F.hardshrink, torch.hardshrink, "hardshrink")
alias(nn.Softshrink, F.softshrink)
alias(nn.Threshold, F.threshold, F.threshold_, torch.threshold, torch.threshold_)

#: SELU's constants (Klambauer et al., 2017), as in ``torch.nn.functional.selu``.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _indicator(condition, like):
    return condition.to(like.dtype)


def _zeros(input, *args, **kwargs):
    return torch.zeros_like(input)


# -- piecewise linear ------------------------------------------------------------------------


def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return F.hardtanh(input, min_val, max_val)


def _hardtanh_d1(input, min_val=-1.0, max_val=1.0):
    return _indicator((input > min_val) & (input < max_val), input)


def _relu6(input, inplace=False):
    return F.relu6(input)


def _relu6_d1(input):
    return _indicator((input > 0) & (input < 6), input)


def _hardsigmoid(input, inplace=False):
    # F.relu6(x + 3) / 6 is F.hardsigmoid's arithmetic; aten's hardsigmoid_backward has no
    # forward-mode derivative, which check_rule's Hessian-vector products need.
    return F.relu6(input + 3) / 6


def _hardsigmoid_d1(input):
    return _indicator((input > -3) & (input < 3), input) / 6


def _hardshrink(input, lambd=0.5):
    return F.hardshrink(input, lambd)


def _softshrink(input, lambd=0.5):
    return F.softshrink(input, lambd)


def _shrink_d1(input, lambd=0.5):
    return _indicator(input.abs() > lambd, input)


def _threshold(input, threshold, value, inplace=False):
    return F.threshold(input, threshold, value)


def _threshold_d1(input, threshold, value):
    return _indicator(input > threshold, input)


elementwise_rule(
    F.hardtanh,
    function=_hardtanh,
    name="hardtanh",
    first=_hardtanh_d1,
    second=_zeros,
    options=[{"min_val": -0.5, "max_val": 2.0}],
)
elementwise_rule(F.relu6, function=_relu6, name="relu6", first=_relu6_d1, second=_zeros)
elementwise_rule(
    F.hardsigmoid, function=_hardsigmoid, name="hardsigmoid", first=_hardsigmoid_d1, second=_zeros
)
elementwise_rule(
    F.hardshrink,
    function=_hardshrink,
    name="hardshrink",
    first=_shrink_d1,
    second=_zeros,
    options=[{"lambd": 1.5}],
)
elementwise_rule(
    F.softshrink,
    function=_softshrink,
    name="softshrink",
    first=_shrink_d1,
    second=_zeros,
    options=[{"lambd": 1.5}],
)


class _ThresholdRule(ElementwiseRule):
    """``threshold`` has no default options, so its samples always pass them."""

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2, 0.5, -1.0)),
            Sample((randn(2, 3, 2, 2, seed=1) * 2, -0.3, 2.0)),
            Sample((randn(3, 5, seed=7) * 3,), dict(threshold=1.0, value=0.0)),
        ]


register_rule(F.threshold)(_ThresholdRule("threshold", _threshold, _threshold_d1, _zeros))


# -- piecewise smooth ---------------------------------------------------------------------------


def _hardswish(input, inplace=False):
    return F.hardswish(input)


def _hardswish_d1(input):
    middle = (2 * input + 3) / 6
    return torch.where(input < -3, 0.0, torch.where(input > 3, 1.0, middle)).to(input.dtype)


def _hardswish_d2(input):
    return _indicator((input > -3) & (input < 3), input) / 3


def _selu(input, inplace=False):
    return F.selu(input)


def _selu_d1(input):
    return _SELU_SCALE * torch.where(input > 0, 1.0, _SELU_ALPHA * torch.exp(input)).to(input.dtype)


def _selu_d2(input):
    return _SELU_SCALE * torch.where(input > 0, 0.0, _SELU_ALPHA * torch.exp(input)).to(input.dtype)


def _celu(input, alpha=1.0, inplace=False):
    return F.celu(input, alpha)


def _celu_d1(input, alpha=1.0):
    return torch.where(input > 0, 1.0, torch.exp(input / alpha)).to(input.dtype)


def _celu_d2(input, alpha=1.0):
    return torch.where(input > 0, 0.0, torch.exp(input / alpha) / alpha).to(input.dtype)


def _softsign(input):
    return F.softsign(input)


def _softsign_d1(input):
    return (1 + input.abs()) ** -2


def _softsign_d2(input):
    return -2 * torch.sign(input) * (1 + input.abs()) ** -3


elementwise_rule(
    F.hardswish, function=_hardswish, name="hardswish", first=_hardswish_d1, second=_hardswish_d2
)
elementwise_rule(F.selu, function=_selu, name="selu", first=_selu_d1, second=_selu_d2)
elementwise_rule(
    F.celu, function=_celu, name="celu", first=_celu_d1, second=_celu_d2, options=[{"alpha": 0.5}]
)
elementwise_rule(
    F.softsign, function=_softsign, name="softsign", first=_softsign_d1, second=_softsign_d2
)


# -- smooth ---------------------------------------------------------------------------------------


def _mish(input, inplace=False):
    return F.mish(input)


def _mish_parts(input):
    s = torch.sigmoid(input)
    t = torch.tanh(F.softplus(input))
    return s, t, 1 - t * t


def _mish_d1(input):
    s, t, sech2 = _mish_parts(input)
    return t + input * s * sech2


def _mish_d2(input):
    # d tanh(softplus(x)) / dx = sech2 * s and ds/dx = s (1 - s), with sech2 = 1 - t^2.
    s, t, sech2 = _mish_parts(input)
    return s * sech2 * (2 + input * (1 - s - 2 * t * s))


def _tanhshrink(input):
    return F.tanhshrink(input)


def _tanhshrink_d1(input):
    return torch.tanh(input) ** 2


def _tanhshrink_d2(input):
    t = torch.tanh(input)
    return 2 * t * (1 - t * t)


def _logsigmoid(input):
    return F.logsigmoid(input)


def _logsigmoid_d1(input):
    return torch.sigmoid(-input)


def _logsigmoid_d2(input):
    s = torch.sigmoid(input)
    return -s * (1 - s)


elementwise_rule(F.mish, function=_mish, name="mish", first=_mish_d1, second=_mish_d2)
elementwise_rule(
    F.tanhshrink,
    function=_tanhshrink,
    name="tanhshrink",
    first=_tanhshrink_d1,
    second=_tanhshrink_d2,
)
elementwise_rule(
    F.logsigmoid,
    function=_logsigmoid,
    name="logsigmoid",
    first=_logsigmoid_d1,
    second=_logsigmoid_d2,
)
