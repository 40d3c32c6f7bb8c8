"""The first recorded call of a module, compared with its rule's function.

The first recorded call of each leaf module (``call_module`` node) is also a check of its
rule: the rule's ``function`` on the bound arguments must give the module's output. A rule
whose function is not the module's forward passes ``check_rule``'s derivative pieces (they
are checked against the rule's own function) and would silently give the curvature of
another op. Used by :class:`curvgraph.graph.record.Recorder`.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch.fx
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError
from curvgraph.rules import Context

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["check_forward", "checked", "cloned", "mark_checked", "random_state", "versions"]

#: graph -> ``(node name, module.training)`` of the module calls whose rule was compared
#: with the module's forward (kept beside the graph, dropped with it)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: relative tolerance of the forward check, by the lower precision of the two outputs
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def checked(traced: TracedGraph, key: tuple) -> bool:
    """Whether the module call ``key`` (node name, training) of ``traced`` was compared."""
    return key in _CHECKED.get(traced, ())


def mark_checked(traced: TracedGraph, key: tuple) -> None:
    """Remember that the module call ``key`` of ``traced`` was compared."""
    _CHECKED.setdefault(traced, set()).add(key)


def check_forward(
    traced: TracedGraph,
    n: torch.fx.Node,
    ctx: Context,
    arguments: Dict[str, Any],
    state: tuple,
    seen: Optional[Dict[str, int]] = None,
) -> None:
    """Raise :class:`CurvGraphError` if the rule's function does not give ``ctx.output``.

    ``arguments`` are the bound arguments as the module saw them (:func:`cloned`: copies,
    but for parameters and activations, which neither the module nor the function may
    change in place: ``seen`` holds their :func:`versions` before the module ran, and a
    change is refused), ``state`` the random state before the module ran, restored for the
    rule's function (random ops such as dropout draw alike) and then put back. Calls the
    rule refuses (:meth:`Rule.validate`) are not compared: the methods refuse them with
    their own message. A call that does not mix samples is compared on its first sample
    (:func:`_first_sample`): the check then costs one sample's output, not a batch's; where
    that comparison fails or raises, the whole batch is compared and decides.
    """
    info = traced.infos[n]
    rule = info.rule
    try:
        rule.validate(ctx)
    except Exception:
        return
    name = type(ctx.module).__name__
    owner = f"the rule registered for {name}"
    where = f"at node {n.name!r} (rule {rule.name!r}, {info.where})"
    fix = (
        "Curvature from this rule would be that of another op: fix the rule's function "
        f"and check the rule with curvgraph.testing.check_rule({name}, module=...)"
    )
    seen = seen or {}
    moved = [k for k, version in seen.items() if arguments[k]._version != version]
    if moved:
        raise CurvGraphError(
            f"the module changed its argument(s) {moved} in place {where} without an in-place "
            "flag: the recorded call holds the changed values, so curvature would be taken "
            "at another point. Give the module an `inplace` attribute or compute out of place"
        )
    # on the first sample alone where the call is per sample: the check's memory and time
    # are one sample's; the whole batch where that fails (it alone decides the error)
    for call, expected in (_first_sample(ctx, arguments), (arguments, ctx.output)):
        if call is None:
            continue
        try:
            actual = _call(rule, call, state)
        except Exception as error:
            if call is not arguments:
                continue
            raise CurvGraphError(
                f"{owner} cannot compute the module's call {where}: its function raised "
                f"{type(error).__name__}: {error}. {fix}"
            ) from error
        changed = [k for k, version in seen.items() if arguments[k]._version != version]
        if changed:
            raise CurvGraphError(
                f"{owner} changed the module's argument(s) {changed} in place {where}: a "
                f"rule's function must leave its arguments alone. {fix}"
            )
        mismatch = _mismatch(actual, expected, owner, where, fix)
        del actual
        if mismatch is None:
            return
        if call is arguments:
            raise mismatch


def _first_sample(ctx: Context, arguments: Dict[str, Any]) -> tuple:
    """``(arguments, output)`` of the first sample alone, or ``(None, None)``.

    Only for a call that does not mix samples, with every batched argument a tensor whose
    first axis is the output's (``N > 1``).
    """
    output = ctx.output
    if ctx.mixes_samples or not ctx.batched or output.dim() == 0 or output.shape[0] < 2:
        return None, None
    first = dict(arguments)
    for slot in ctx.batched:
        value = arguments.get(slot)
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != output.shape[0]:
            return None, None
        first[slot] = value[:1]
    return first, output[:1]


def _call(rule, arguments: Dict[str, Any], state: tuple) -> Any:
    """The rule's function on ``arguments``, drawing random numbers as the module did."""
    with torch.no_grad(), torch.random.fork_rng(devices=state[1], enabled=True):
        _set_random_state(state)
        return rule.call(arguments)


def _mismatch(actual: Any, expected: Tensor, owner: str, where: str, fix: str):
    """A :class:`CurvGraphError` if ``actual`` is not ``expected`` (allclose), else ``None``."""
    if not isinstance(actual, Tensor) or actual.shape != expected.shape:
        got = tuple(actual.shape) if isinstance(actual, Tensor) else type(actual).__name__
        return CurvGraphError(
            f"{owner} does not compute the module's forward: its function returns {got} "
            f"where the module returns shape {tuple(expected.shape)}, {where}. {fix}"
        )
    if not expected.is_floating_point() or not actual.is_floating_point():
        return None
    tolerance = max(_TOLERANCE.get(t, 1e-3) for t in (expected.dtype, actual.dtype))
    if actual.dtype != expected.dtype:
        wide = torch.promote_types(expected.dtype, actual.dtype)
        actual, expected = actual.to(wide), expected.to(wide)
    with torch.no_grad():  # allclose(rtol=tolerance, atol=tolerance * scale, equal_nan)
        # in place where the tensors are ours: the first forward's peak memory
        excess = (actual - expected).abs_()
        magnitude = expected.abs().nan_to_num_(0.0, 0.0, 0.0)  # a NaN or inf shows in excess
        scale = magnitude.amax().clamp(min=1)
        excess = excess.sub_(magnitude, alpha=tolerance).amax()
        del magnitude
        excess, scale = torch.stack([excess - tolerance * scale, scale]).tolist()
        if not (excess > 0 or math.isnan(excess)):
            return None
        magnitude = expected.abs()
        # rare: a difference, or NaN / inf somewhere (equal ones are no difference)
        same = (actual == expected) | (actual.isnan() & expected.isnan())
        difference = torch.where(same, 0.0, (actual - expected).abs().nan_to_num(math.inf))
        bound = tolerance * (magnitude.nan_to_num(0.0, 0.0, 0.0) + scale)
        if not (difference > bound).any():
            return None
        difference = difference.amax().item()
    return CurvGraphError(
        f"{owner} does not compute the module's forward: max difference {difference:.3g} "
        f"(output scale {scale:.3g}, {expected.dtype}) between the module's output and the "
        f"rule's function, {where}. {fix}"
    )


def cloned(arguments: Dict[str, Any], shared: frozenset = frozenset()) -> Dict[str, Any]:
    """Bound arguments with their tensors (also in lists and tuples) detached and copied.

    Parameters and the slots in ``shared`` (the activations of a call that does not work in
    place) are not copied: the module leaves them alone, and so does every rule's
    function (the first forward's peak would hold a copy of each);
    :func:`check_forward` refuses a module or function that changed one in place
    (:func:`versions` before the call).
    """

    def copy(value):
        if isinstance(value, nn.Parameter):
            return value
        if isinstance(value, Tensor):
            return value.detach().clone()
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(copy(v) for v in value)
        return value

    with torch.no_grad():
        return {k: v if k in shared else copy(v) for k, v in arguments.items()}


def versions(arguments: Dict[str, Any]) -> Dict[str, int]:
    """``slot -> _version`` of the tensors :func:`cloned` did not copy (single tensors)."""
    return {
        k: v._version
        for k, v in arguments.items()
        # sparse and other non-strided layouts have no data_ptr (and no rule takes one)
        if isinstance(v, Tensor)
        and v.layout == torch.strided
        and not v.is_inference()
        and v.data_ptr()
    }


def random_state(args: tuple, kwargs: dict) -> tuple:
    """The CPU random state and, for CUDA inputs, the states of their devices."""
    values = [*args, *kwargs.values()]
    cuda_values = [a for a in values if isinstance(a, Tensor) and a.is_cuda]
    devices = sorted(
        {
            torch.cuda.current_device() if a.device.index is None else a.device.index
            for a in cuda_values
        }
    )
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), devices, cuda


def _set_random_state(state: tuple) -> None:
    cpu, devices, cuda = state
    torch.set_rng_state(cpu)
    for device, value in zip(devices, cuda):
        torch.cuda.set_rng_state(value, device)
