"""Elementwise activations: ``y = phi(x)``, one line each (``phi``, ``phi'``, ``phi''``).

Derivatives are written in closed form; ``tests/test_rules.py`` checks each against
``torch.func`` in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import elementwise_rule
from curvgraph.rules.registry import alias

alias(nn.ReLU, F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_")
alias(nn.Sigmoid, torch.sigmoid, torch.sigmoid_, F.sigmoid, "sigmoid", "sigmoid_")
alias(nn.Tanh, torch.tanh, torch.tanh_, F.tanh, "tanh", "tanh_")
alias(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_)
alias(nn.ELU, F.elu, F.elu_)
alias(nn.Softplus, F.softplus)
alias(nn.SiLU, F.silu)
alias(nn.GELU, F.gelu)

_SQRT_2PI = math.sqrt(2 * math.pi)
_TANH_C = math.sqrt(2 / math.pi)  # GELU tanh approximation: u = c (x + 0.044715 x^3)


def _sigmoid_d1(input):
    s = torch.sigmoid(input)
    return s * (1 - s)


def _sigmoid_d2(input):
    s = torch.sigmoid(input)
    return s * (1 - s) * (1 - 2 * s)


def _normal_pdf(x):
    return torch.exp(-0.5 * x * x) / _SQRT_2PI


def _gelu_d1(input, approximate="none"):
    if approximate == "tanh":
        u = _TANH_C * (input + 0.044715 * input**3)
        du = _TANH_C * (1 + 3 * 0.044715 * input**2)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * input * (1 - t * t) * du
    return 0.5 * (1 + torch.erf(input / math.sqrt(2))) + input * _normal_pdf(input)


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
    first=lambda input, inplace=False: (input > 0).to(input.dtype),
    second=lambda input, inplace=False: torch.zeros_like(input),
    name="relu",
)
elementwise_rule(
    torch.sigmoid,
    function=lambda input: torch.sigmoid(input),
    first=_sigmoid_d1,
    second=_sigmoid_d2,
    name="sigmoid",
)
elementwise_rule(
    torch.tanh,
    function=lambda input: torch.tanh(input),
    first=lambda input: 1 - torch.tanh(input) ** 2,
    second=lambda input: -2 * torch.tanh(input) * (1 - torch.tanh(input) ** 2),
    name="tanh",
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
        _softplus_linear(input, beta, threshold), 0.0, beta * _sigmoid_d1(beta * input)
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
    options=[{"approximate": "tanh"}],
)
