"""Op keys: how a traced node names its operation, and which spellings mean one op.

An *op key* is an ``nn.Module`` subclass for leaf modules (``call_module``), a Python
callable (``call_function``: ``torch.relu``, ``F.relu``, ``operator.add``) or a Tensor
method name (``call_method``: ``"relu"``). Spellings of the same op (``nn.ReLU``, ``F.relu``,
``torch.relu``, ``"relu"``, ``"relu_"``, ...) form one *alias group*; the tables of
:mod:`curvgraph.ops.table` register a value for every key of a group at once.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch

__all__ = [
    "OpKey",
    "autograd_function",
    "canonical_key",
    "check_op_key",
    "op_name",
    "alias",
    "aliases_of",
    "alias_tensor_methods",
    "tensor_method_keys",
    "is_inplace",
]

OpKey = Union[type, Callable, str]

_ALIAS_GROUPS: Dict[Any, frozenset] = {}


def autograd_function(key: Any) -> Optional[type]:
    """The ``torch.autograd.Function`` subclass an op key stands for, or ``None``.

    ``MyFunction``, ``MyFunction.apply`` and the capture's ``ApplyOf(MyFunction)``
    (:mod:`curvgraph.ops.functions`) all stand for ``MyFunction``.
    """
    if isinstance(key, type):
        return key if issubclass(key, torch.autograd.Function) else None
    function = getattr(key, "__autograd_function__", None)  # ApplyOf
    if function is not None:
        return function
    owner = getattr(key, "__self__", None)  # MyFunction.apply: a method bound to the class
    if (
        isinstance(owner, type)
        and issubclass(owner, torch.autograd.Function)
        and getattr(key, "__name__", None) == "apply"
    ):
        return owner
    return None


def check_op_key(key: Any, what: str = "an op key") -> None:
    """Raise ``TypeError`` naming ``key`` unless it is a valid op key.

    Valid: an ``nn.Module`` subclass (or another class), a callable, or a str (a Tensor
    method's name). A module *instance* is refused too (its class is the key).
    """
    if isinstance(key, torch.nn.Module):
        raise TypeError(
            f"{what} must be an nn.Module subclass, not an instance: got {key!r}; "
            f"pass its class {type(key).__module__}.{type(key).__qualname__}"
        )
    if not (isinstance(key, str) or callable(key)):
        raise TypeError(
            f"{what} must be an nn.Module subclass, a callable or a str (a Tensor method's "
            f"name), got {key!r} of type {type(key).__name__}"
        )


def canonical_key(key: OpKey) -> Any:
    """Normalize a spelling.

    Tensor methods (``torch.Tensor.relu``) become their name; a custom autograd Function's
    ``MyFunction.apply`` (and its capture, ``ApplyOf(MyFunction)``) becomes ``MyFunction``.
    """
    if isinstance(key, (str, type)):
        return key
    function = autograd_function(key)
    if function is not None:
        return function
    name = getattr(key, "__name__", None)
    if name is not None and getattr(torch.Tensor, name, None) is key:
        return name
    return key


def op_name(key: OpKey) -> str:
    """Readable name of an op key (``torch.nn.Linear``, ``torch.relu``, ``Tensor.view``)."""
    if isinstance(key, str):
        return f"Tensor.{key}"
    if hasattr(key, "__op_name__"):  # keys that name themselves (OutputOf, ApplyOf)
        return key.__op_name__()
    function = autograd_function(key)
    if function is not None:  # MyFunction, MyFunction.apply: "module.MyFunction.apply"
        return f"{function.__module__}.{function.__qualname__}.apply"
    module = getattr(key, "__module__", None) or ""
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", repr(key))
    if name.startswith("_VariableFunctionsClass."):  # torch.cumprod and friends
        name, module = name.split(".", 1)[1], "torch"
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    elif module in ("torch._C._nn", "torch._C._VariableFunctions", "torch._VariableFunctions"):
        module = "torch"
    return f"{module}.{name}" if module else name


def alias(*keys: OpKey) -> None:
    """Declare spellings of the same op, so that they share one rule."""
    group = frozenset(canonical_key(k) for k in keys)
    for k in list(group):
        group = group | _ALIAS_GROUPS.get(k, frozenset())
    for k in group:
        _ALIAS_GROUPS[k] = group


def aliases_of(key: OpKey) -> frozenset:
    """Every spelling in the alias group of ``key`` (``{key}`` if it has none)."""
    key = canonical_key(key)
    return _ALIAS_GROUPS.get(key, frozenset([key]))


def tensor_method_keys(*names: str, inplace: bool = True) -> List[Any]:
    """Spellings of Tensor-method ops: ``torch.<name>``, ``"<name>"`` and ``"<name>_"``.

    ``torch.<name>`` where it exists; the in-place ``"<name>_"`` with ``inplace`` and where
    the Tensor method exists.
    """
    keys: List[Any] = []
    for n in names:
        keys += [k for k in (getattr(torch, n, None), n) if k is not None]
        if inplace and hasattr(torch.Tensor, n + "_"):
            keys.append(n + "_")
    return keys


def alias_tensor_methods(*names: str, inplace: bool = True) -> None:
    """For each name, alias ``torch.<name>``, ``Tensor.<name>`` and (``inplace``) ``<name>_``.

    ``alias_tensor_methods("sin", "cos")`` is ``alias(torch.sin, "sin", "sin_")`` and
    ``alias(torch.cos, "cos", "cos_")``.
    """
    for n in names:
        alias(*tensor_method_keys(n, inplace=inplace))


def is_inplace(key: Any, arguments: Dict[str, Any]) -> bool:
    """Whether a call modifies its first argument in place (``relu_``, ``inplace=True``)."""
    name = key if isinstance(key, str) else getattr(key, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or arguments.get("inplace") is True
