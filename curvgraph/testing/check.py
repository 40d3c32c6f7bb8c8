"""``check_rule``: every piece of a rule over its sample calls, and the module forwards.

The pieces are listed in the package docstring (:mod:`curvgraph.testing`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
from torch import nn

from curvgraph.rules.registry import OpKey, Rule, Sample, lookup_rule
from curvgraph.testing.derivatives import _Check
from curvgraph.testing.forward import ModuleSource, _modules_of, forward_error


def check_rule(
    op_or_rule: Union[Rule, OpKey, nn.Module],
    samples: Optional[List[Sample]] = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    module: Optional[ModuleSource] = None,
) -> Dict[str, float]:
    """Largest relative error of each piece of a rule over its sample calls.

    Args:
        op_or_rule: a rule, an op key whose registered rule is checked, or a module instance
            (its class's rule, compared with this module's forward).
        samples: calls to check (default: the rule's :meth:`Rule.samples`).
        dtype: precision of the comparison.
        device: where to run it.
        module: the module whose ``forward`` the rule's function must compute (``forward``
            piece): an instance (copied for each sample) or a factory called without
            arguments (a class, ``lambda: LogScale(4)``). Default: ``op_or_rule`` if it is a
            module instance; else every module class the rule is registered for that can be
            built without arguments (one that cannot is skipped, with a warning unless it is
            one of torch's).

    Returns:
        piece -> largest ``max|rule - reference| / max(1, max|reference|)`` (pieces listed
        in the module docstring; ``forward`` only where a module was compared).

    Raises:
        ValueError: no rule, or no samples to check; a ``module`` for a rule without a
            ``function``.
        AssertionError: a piece of the rule has the wrong shape (``forward``: the rule's
            function and the module's forward return different shapes).
    """
    if isinstance(op_or_rule, nn.Module):
        module = op_or_rule if module is None else module
        op_or_rule = type(op_or_rule)
    rule = op_or_rule if isinstance(op_or_rule, Rule) else lookup_rule(op_or_rule)
    if rule is None:
        raise ValueError(f"no rule registered for {op_or_rule!r}")
    samples = rule.samples() if samples is None else samples
    if not samples:
        raise ValueError(f"rule {rule.name!r} has no samples: implement Rule.samples()")
    errors: Dict[str, float] = {}
    for sample in samples:
        for piece, error in _Check(rule, sample, dtype, device).run().items():
            errors[piece] = max(errors.get(piece, 0.0), error)
    strict = module is not None  # a module built here may refuse samples of other spellings
    for factory in _modules_of(op_or_rule, rule, module):
        for sample in samples:
            error = forward_error(rule, sample, factory, dtype=dtype, device=device, strict=strict)
            if error is not None:
                errors["forward"] = max(errors.get("forward", 0.0), error)
    return errors
