"""Smooth activations: ``y = phi(x)``, one line each (``phi``, ``phi'``, ``phi''``), and GLU.

Derivatives are written in closed form; ``tests/test_rules.py`` checks each against
``torch.func`` in float64. ``relu`` (``phi'' = 0``), ``elu``, ``selu``, ``celu`` and
``softsign`` are smooth away from 0; the piecewise-linear ones are in :mod:`.piecewise`.
Every canonical signature names its options like the ``nn`` module attributes (``alpha``,
``beta``, ...), so module spellings bind them by name.

``glu(x) = u * sigma(v)`` with ``(u, v)`` the two halves of ``x`` along ``dim`` (``sigma``
the logistic sigmoid, ``K`` columns, ``N`` samples): ``J t = t_u sigma(v) + u sigma'(v) t_v``;
``sum_k g_k d2 y_k`` has the blocks ``[[0, g sigma'(v)], [g sigma'(v), g u sigma''(v)]]`` per
entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import elementwise_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import General, Residual

__all__ = ["GLURule"]

alias(nn.ReLU, F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")
alias(nn.Sigmoid, torch.sigmoid, torch.sigmoid_, F.sigmoid, "sigmoid", "sigmoid_")
alias(nn.Tanh, torch.tanh, torch.tanh_, F.tanh, "tanh", "tanh_")
alias(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_)
alias(nn.ELU, F.elu, F.elu_)
alias(nn.Softplus, F.softplus)
alias(nn.SiLU, F.silu)
alias(nn.GELU, F.gelu)
alias(nn.SELU, F.selu, F.selu_, torch.selu, torch.selu_)
alias(nn.CELU, F.celu, F.celu_, torch.celu, torch.celu_)
alias(nn.Softsign, F.softsign)
alias(nn.Mish, F.mish)
alias(nn.Tanhshrink, F.tanhshrink)
alias(nn.LogSigmoid, F.logsigmoid)
alias(nn.GLU, F.glu)

_SQRT_2PI = math.sqrt(2 * math.pi)
_TANH_C = math.sqrt(2 / math.pi)  # GELU tanh approximation: u = c (x + 0.044715 x^3)
#: SELU's constants (Klambauer et al., 2017), as in ``torch.nn.functional.selu``.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _relu_product(y, t, out=None, inplace=False):
    """``relu'(x) * t`` from the output ``y``: ``t`` where ``y > 0``, else 0 (no ``phi'``)."""
    if out is None:
        return torch.ops.aten.threshold_backward(t, y, 0)
    return torch.ops.aten.threshold_backward.grad_input(t, y, 0, grad_input=out)


def _sigmoid_d1(s):  # of the output s = sigmoid(x)
    return s * (1 - s)


def _sigmoid_d2(s):
    return s * (1 - s) * (1 - 2 * s)


def _normal_pdf(x):
    return torch.exp(-0.5 * x * x) / _SQRT_2PI


def _gelu_d1(input, approximate="none"):
    # torch's fused GELU derivative: one kernel instead of ~8 (~6x faster on the CPU)
    return torch.ops.aten.gelu_backward(torch.ones_like(input), input, approximate=approximate)


def _gelu_product(input, t, out=None, approximate="none"):
    """``gelu'(x) * t`` by torch's fused kernel, ``x`` broadcast over ``t``'s leading axes."""
    x = input.expand(t.shape)  # the kernel does not broadcast (oneDNN refuses [1, *x] vs x)
    if out is None:
        return torch.ops.aten.gelu_backward(t, x, approximate=approximate)
    return torch.ops.aten.gelu_backward.grad_input(t, x, approximate=approximate, grad_input=out)


def _gelu_d2(input, approximate="none"):
    if approximate == "tanh":
        u = _TANH_C * (input + 0.044715 * input**3)
        du = _TANH_C * (1 + 3 * 0.044715 * input**2)
        ddu = _TANH_C * 6 * 0.044715 * input
        t = torch.tanh(u)
        return (1 - t * t) * (du + 0.5 * input * (ddu - 2 * t * du * du))
    return _normal_pdf(input) * (2 - input * input)


def _softplus_linear(input, beta, threshold):
    return input * beta > threshold


def _silu_d1(input, inplace=False):
    s = torch.sigmoid(input)
    return s * (1 + input * (1 - s))


def _silu_d2(input, inplace=False):
    s = torch.sigmoid(input)
    return s * (1 - s) * (2 + input * (1 - 2 * s))


elementwise_rule(
    F.relu,
    function=lambda input, inplace=False: F.relu(input),
    first=lambda y, inplace=False: (y > 0).to(y.dtype),  # of the output: y > 0 iff x > 0
    second=lambda y, inplace=False: torch.zeros_like(y),
    name="relu",
    of_output=True,
    product=_relu_product,
)
elementwise_rule(
    torch.sigmoid,
    function=lambda input: torch.sigmoid(input),
    first=_sigmoid_d1,
    second=_sigmoid_d2,
    name="sigmoid",
    of_output=True,
)
elementwise_rule(
    torch.tanh,
    function=lambda input: torch.tanh(input),
    first=lambda y: 1 - y**2,  # of the output y = tanh(x)
    second=lambda y: -2 * y * (1 - y**2),
    name="tanh",
    of_output=True,
)
elementwise_rule(
    F.leaky_relu,
    function=lambda input, negative_slope=0.01, inplace=False: F.leaky_relu(input, negative_slope),
    first=lambda input, negative_slope=0.01: torch.where(
        input > 0, torch.ones_like(input), torch.full_like(input, negative_slope)
    ),
    second=lambda input, negative_slope=0.01: torch.zeros_like(input),
    name="leaky_relu",
    options=[{"negative_slope": 0.2}],
)
elementwise_rule(
    F.elu,
    function=lambda input, alpha=1.0, inplace=False: F.elu(input, alpha),
    first=lambda input, alpha=1.0: torch.where(input > 0, 1.0, alpha * torch.exp(input)).to(
        input.dtype
    ),
    second=lambda input, alpha=1.0: torch.where(input > 0, 0.0, alpha * torch.exp(input)).to(
        input.dtype
    ),
    name="elu",
    options=[{"alpha": 0.5}],
)
elementwise_rule(
    F.softplus,
    function=lambda input, beta=1.0, threshold=20.0: F.softplus(input, beta, threshold),
    first=lambda input, beta=1.0, threshold=20.0: torch.where(
        _softplus_linear(input, beta, threshold), 1.0, torch.sigmoid(beta * input)
    ).to(input.dtype),
    second=lambda input, beta=1.0, threshold=20.0: torch.where(
        _softplus_linear(input, beta, threshold),
        0.0,
        beta * _sigmoid_d1(torch.sigmoid(beta * input)),
    ).to(input.dtype),
    name="softplus",
    options=[{"beta": 2.0, "threshold": 3.0}],
)
elementwise_rule(
    F.silu,
    function=lambda input, inplace=False: F.silu(input),
    first=_silu_d1,
    second=_silu_d2,
    name="silu",
)
elementwise_rule(
    F.gelu,
    function=lambda input, approximate="none": F.gelu(input, approximate=approximate),
    first=_gelu_d1,
    second=_gelu_d2,
    name="gelu",
    product=_gelu_product,
    options=[{"approximate": "tanh"}],
)


# -- exponential and algebraic tails --------------------------------------------------------------
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


elementwise_rule(F.selu, function=_selu, name="selu", first=_selu_d1, second=_selu_d2)
elementwise_rule(
    F.celu, function=_celu, name="celu", first=_celu_d1, second=_celu_d2, options=[{"alpha": 0.5}]
)
elementwise_rule(
    F.softsign, function=_softsign, name="softsign", first=_softsign_d1, second=_softsign_d2
)


# -- compositions of smooth functions -------------------------------------------------------------
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


# -- GLU ------------------------------------------------------------------------------------------
def _glu(input, dim=-1):
    return F.glu(input, dim)


@register_rule(F.glu)
class GLURule(Rule):
    """``y = u * sigma(v)`` with ``(u, v) = x.chunk(2, dim)`` (see the module docstring)."""

    name = "glu"
    function, signature = canonical(_glu)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2,)),
            Sample((randn(2, 4, 3, seed=1) * 2,), dict(dim=1)),
            Sample((randn(2, 3, 2, 2, seed=2) * 2, -2)),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments["dim"] == 0:
            raise UnsupportedConfigurationError(
                "glu along dimension 0 splits the batch axis: use a feature dimension"
            )

    def validate(self, ctx):  # noqa: D102
        if ctx.dim % ctx.input.dim() == 0:
            raise UnsupportedConfigurationError(
                f"glu along dimension {ctx.dim} of a {ctx.input.dim()}-d input splits the "
                "batch axis: use a feature dimension"
            )

    def _axis(self, ctx, lead: int) -> int:
        return ctx.dim % ctx.input.dim() + lead

    def _parts(self, ctx):
        """``u``, ``sigma(v)``, ``sigma'(v)``, ``sigma''(v)``."""

        def compute():
            u, v = ctx.input.chunk(2, self._axis(ctx, 0))
            s = torch.sigmoid(v)
            d1 = s * (1 - s)
            return u, s, d1, d1 * (1 - 2 * s)

        return ctx.cached("parts", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        u, s, d1, _ = self._parts(ctx)
        t_u, t_v = tangents["input"].chunk(2, self._axis(ctx, 1))
        return t_u * s + u * d1 * t_v

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        u, s, d1, _ = self._parts(ctx)
        return {"input": torch.cat([cotangent * s, cotangent * u * d1], self._axis(ctx, 1))}

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        u, _, d1, d2 = self._parts(ctx)
        cross, own = grad_output * d1, grad_output * u * d2

        def product(t, wanted):
            if "input" not in t:
                return {}
            t_u, t_v = t["input"].chunk(2, self._axis(ctx, 1))
            return {"input": torch.cat([cross * t_v, cross * t_u + own * t_v], self._axis(ctx, 1))}

        return General(product)
