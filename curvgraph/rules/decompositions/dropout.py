"""Dropout variants and stochastic depth, rewritten so that their random mask is recorded.

Each call becomes ``mask = dropout_mask(x, kind, ...)`` and
``y = apply_dropout_mask(x, mask, kind, ...)`` (:mod:`curvgraph.rules.dropout`). A module's
``p`` and ``training`` are read from the module at run time (``owner``), so
``model.train()`` / ``model.eval()`` after tracing take effect; functional spellings pass
them as traced. The modules besides ``nn.Dropout`` (whose rule is
:class:`~curvgraph.rules.dropout.DropoutRule`) get placeholder rules that keep them leaves.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from curvgraph.ops import register_decomposition
from curvgraph.rules.dropout import apply_dropout_mask, dropout_mask
from curvgraph.rules.factories import PlaceholderRule
from curvgraph.rules.registry import UnsupportedConfigurationError, register_rule


def _decomposition(kind: str):
    def module_call(call, input, *args, **kwargs):
        owner = call.owner()
        mask = call.function(dropout_mask, input, kind, owner=owner)
        return call.function(apply_dropout_mask, input, mask, kind, owner=owner)

    return module_call


for _module, _kind in [
    (nn.Dropout, "element"),
    (nn.Dropout1d, "feature1d"),
    (nn.Dropout2d, "feature2d"),
    (nn.Dropout3d, "feature3d"),
    (nn.AlphaDropout, "alpha"),
    (nn.FeatureAlphaDropout, "feature_alpha"),
]:
    register_decomposition(_module)(_decomposition(_kind))


def _functional(kind: str):
    def function_call(call, input, p=0.5, training=True, inplace=False):
        if isinstance(p, torch.fx.Proxy) or isinstance(training, torch.fx.Proxy):
            raise UnsupportedConfigurationError("dropout with p or training computed in the graph")
        mask = call.function(dropout_mask, input, kind, p, training)
        return call.function(apply_dropout_mask, input, mask, kind, p, training)

    return function_call


for _function, _kind in [
    (F.dropout, "element"),
    (F.dropout1d, "feature1d"),
    (F.dropout2d, "feature2d"),
    (F.dropout3d, "feature3d"),
    (F.alpha_dropout, "alpha"),
    (F.feature_alpha_dropout, "feature_alpha"),
]:
    register_decomposition(_function)(_functional(_kind))


for _module in (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    register_rule(_module)(PlaceholderRule(_module.__name__))

try:  # torchvision is optional
    import torchvision.ops as _ops
except ImportError:  # pragma: no cover
    _ops = None

if _ops is not None:

    @register_decomposition(_ops.StochasticDepth)
    def _stochastic_depth_module(call, input):
        if call.module.mode not in ("row", "batch"):
            raise UnsupportedConfigurationError(f"stochastic depth mode {call.module.mode!r}")
        owner, mode = call.owner(), call.module.mode
        mask = call.function(dropout_mask, input, mode, owner=owner)
        return call.function(apply_dropout_mask, input, mask, mode, owner=owner)

    @register_decomposition(_ops.stochastic_depth)
    def _stochastic_depth(call, input, p, mode, training=True):
        if mode not in ("row", "batch") or isinstance(training, torch.fx.Proxy):
            raise UnsupportedConfigurationError(f"stochastic_depth with mode={mode!r}")
        mask = call.function(dropout_mask, input, mode, p, training)
        return call.function(apply_dropout_mask, input, mask, mode, p, training)

    register_rule(_ops.StochasticDepth)(PlaceholderRule("StochasticDepth"))
