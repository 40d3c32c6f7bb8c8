"""The ``forward`` piece: a rule's function against a module's own ``forward``."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from curvgraph.rules.registry import Rule, Sample, registered_rules
from curvgraph.testing.tensors import _convert, _error

#: a module to compare a rule with: an instance (copied per sample) or a factory (a class)
ModuleSource = Union[nn.Module, Callable[[], nn.Module]]


def forward_error(
    rule: Rule,
    sample: Sample,
    module: ModuleSource,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> Optional[float]:
    """Relative error of ``rule``'s function against ``module``'s forward on one sample call.

    The module is called as a traced model calls it: the sample's leading canonical
    arguments are its forward arguments (as many as ``forward`` requires), and every other
    canonical argument the module has an attribute for is set on (a copy of) the module
    from the sample (parameters and buffers included), so that the module computes the
    sample's call. The rule's function gets the arguments ``Rule.bind`` reads from that
    call and module, as when a traced graph records it. Both run under the same random
    seed (random ops such as dropout in training mode compare equal when they draw alike),
    in ``dtype`` on ``device``, without gradients.

    Args:
        rule: the rule.
        sample: one call in the rule's canonical signature.
        module: an instance (copied) or a factory called without arguments.
        dtype: precision of the comparison.
        device: where to run it.
        strict: raise what the module's forward raises on the sample (``False``: compare
            nothing, for samples written for another spelling, e.g. a 2-d input of
            ``F.batch_norm`` that ``nn.BatchNorm2d`` refuses).

    Returns:
        ``max|rule(...) - module(...)| / max(1, max|module(...)|)``; ``None`` where nothing
        is compared (the rule has no ``function``, the sample calls a ``Sample.function``,
        the module returns no tensor or, unless ``strict``, refuses the sample).

    Raises:
        AssertionError: the two outputs have different shapes, or the rule's function
            returns no tensor where the module returns one.
    """
    if rule.function is None or sample.function is not None:
        return None
    built = copy.deepcopy(module) if isinstance(module, nn.Module) else module()
    if not isinstance(built, nn.Module):
        raise TypeError(f"module factory {module!r} returned {built!r}, not an nn.Module")
    built = built.to(device=device, dtype=dtype)
    args = tuple(_convert(a, dtype, device) for a in sample.args)
    kwargs = {k: _convert(v, dtype, device) for k, v in sample.kwargs.items()}
    canonical = rule.bind(args, kwargs)
    names = _forward_names(built, rule)
    for name, value in canonical.items():
        if name not in names:
            _load(built, name, value)
    inputs = tuple(canonical[name] for name in names)
    arguments = _cloned(rule.bind(inputs, {}, built))
    with torch.no_grad():
        try:
            expected = _seeded(device, built, *_cloned(inputs))
        except Exception:
            if strict:
                raise
            return None
        if not isinstance(expected, Tensor):
            return None
        actual = _seeded(device, rule.call, arguments)
    label = f"forward of {type(built).__name__} vs rule {rule.name!r}"
    if not isinstance(actual, Tensor):
        raise AssertionError(f"{label}: the rule's function returned {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{label}: the rule's function returns shape {tuple(actual.shape)}, the module "
            f"{tuple(expected.shape)}"
        )
    if not actual.is_floating_point() or not expected.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else math.inf
    return _error(actual.to(expected.dtype), expected)


def _modules_of(op_or_rule, rule: Rule, module: Optional[ModuleSource]) -> List[ModuleSource]:
    """The modules :func:`check_rule` compares the rule with (see its ``module`` argument)."""
    if module is not None:
        if rule.function is None:
            raise ValueError(f"rule {rule.name!r} has no function to compare with {module!r}")
        return [module]
    if rule.function is None:
        return []
    if isinstance(op_or_rule, type) and issubclass(op_or_rule, nn.Module):
        classes = [op_or_rule]
    else:
        keys = registered_rules().get(rule, ())
        classes = [k for k in keys if isinstance(k, type) and issubclass(k, nn.Module)]
    result = []
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        try:
            cls()
        except Exception as error:  # needs constructor arguments
            if cls.__module__.partition(".")[0] not in ("torch", "torchvision"):
                warnings.warn(
                    f"check_rule: {cls.__qualname__}() cannot be built without arguments "
                    f"({type(error).__name__}: {error}), so rule {rule.name!r} was not compared "
                    f"with its forward; pass module={cls.__qualname__}(...) or a factory",
                    stacklevel=3,
                )
            continue
        result.append(cls)
    return result


def _forward_names(module: nn.Module, rule: Rule) -> Tuple[str, ...]:
    """Canonical names of the module's forward arguments (leading, positional).

    As many as ``forward`` requires positionally; for ``forward(*args)`` (or no signature),
    the leading canonical arguments the module has no attribute for.
    """
    leading = []
    for param in rule.signature.parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        leading.append(param.name)
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = None
    if parameters is None or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        count = 0
        while count < len(leading) and not hasattr(module, leading[count]):
            count += 1
        return tuple(leading[: max(count, 1)])
    required = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return tuple(leading[: len(required)])


def _load(module: nn.Module, name: str, value: Any) -> None:
    """Set the module attribute ``name`` (if it has one) to a sample's canonical value."""
    if not hasattr(module, name) or isinstance(getattr(module, name), nn.Module):
        return
    current = getattr(module, name)
    if isinstance(current, tuple) and isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * len(current)  # modules keep sizes as tuples (nn.ConvTranspose2d)
    if name in module._parameters and isinstance(value, Tensor):
        value = nn.Parameter(value.clone(), requires_grad=False)
    elif isinstance(value, Tensor):
        value = value.clone()
    try:
        setattr(module, name, value)
    except (AttributeError, TypeError):  # a read-only property: the module keeps its value
        pass


def _cloned(value: Any) -> Any:
    """Tensors (also in dicts, lists and tuples) copied, so that calls cannot alter them."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _seeded(device, function: Callable, *args) -> Any:
    """``function(*args)`` from a fixed random state (the caller's state is kept)."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return function(*args)
