"""Issue 14, "How it is checked": random models that mix the traps, right or refused.

A hypothesis strategy builds small random models from supported ops (an optional conv stem,
linear layers, activations, residual adds, concatenations, a parameter used directly as
``F.linear(h, w)``) and inserts the traps of issue 14 into them:

- inside the model: ops without a derivative (``sign``, a comparison, ``one_hot(argmax)``)
  on the main path (cutting every earlier parameter off) or on a branch, a parameter read
  only by a comparison, a custom ``torch.autograd.Function`` (a straight-through estimator);
- around it: a parameter replaced after ``trace`` (before the first forward), a submodule
  swapped between two forwards, a parameter replaced between the forward and the curvature
  call, an in-place step between them or after the curvature was computed, a penalty
  ``c ||theta||^2`` added to the loss, a term that couples the samples.

For every registered method and every curvature it computes, the result is either right or
refused with a ``CurvGraphError`` whose message names the cause (``REFUSALS``); the traps
that must be refused are. Right means equal in float64 to the definition of the method
(``torch.func`` only: ``tests/reference.py``; the PCH by ``tests/reference_graph.py``, at one
sample): exact blocks for ``exact`` (three samples), ``hbp``/``kfra``/``kflr``/``ekfac`` at
one sample, exact GGN blocks for ``sqrt`` and their diagonal for ``diag`` (three samples);
Monte-Carlo ``kfac`` and the Kronecker blocks of the convolution (an approximation already
for one sample) must be finite, symmetric positive semi-definite blocks of the parameter's
size, EK-FAC's with the exact trace. An accepted penalty must add its Hessian ``2 c I``.
Parameters without a block must have a zero reference block and be named in a warning. No
block may hold a NaN; a hang fails the example (an alarm, never a timing assertion).
After an in-place step every block computed before it must still equal its reference.

Default: the explicit examples (every trap at least once) and 15 derandomized ones;
``CURVGRAPH_SLOW_TESTS=1``: 300. Models and references: ``tests/trap_models.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import warnings

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import curvgraph
from curvgraph.errors import CurvGraphError
from curvgraph.methods import registered_methods

try:
    import trap_models as tm
except ImportError:  # tests/ imported as a package
    from tests import trap_models as tm

SLOW = os.environ.get("CURVGRAPH_SLOW_TESTS") == "1"
#: the traps that refuse, and the pattern their message must match
REFUSALS = {
    "replace_late": "changed after it was traced",
    "step_between": "modified in place after the forward pass",
    "data_replaced": "modified in place after the forward pass",
    "input_modified": "argument 'input' of node '(conv|stem)' .*modified in place after",
    "penalty": "other than through the outputs",
    "coupled": "not a sum of per-sample terms",
    "custom_function": "STE is a custom torch.autograd.Function",
}


@contextlib.contextmanager
def _no_hang(seconds=120):
    """Fail an example that runs for minutes (a hang), not one that is merely slow."""

    def alarm(*_):
        raise TimeoutError(f"a curvature call ran for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- what each method computes ---------------------------------------------------------------
#: method -> (batch size, check): "blocks" equal the reference, "diagonal" its diagonal,
#: "kronecker" equal it except the blocks of ``Case.approximate`` (a convolution's, a tied
#: weight's sum of its uses' Kronecker blocks: docs/methods.md), "eigenbasis" too, and a
#: convolution block has the reference's trace (EK-FAC's diagonal in its basis is the exact
#: one), "sampled" (Monte-Carlo) sane blocks only
DEFINITIONS = {
    "exact": (3, "blocks"),
    "hbp": (1, "blocks"),
    "kfra": (1, "blocks"),
    "sqrt": (3, "blocks"),
    "diag": (3, "diagonal"),
    "kflr": (1, "kronecker"),
    "kfac": (1, "sampled"),
    "ekfac": (1, "eigenbasis"),
}


def _assert_sane(name, block, size):
    assert block.shape == (size, size), (name, block.shape)
    assert torch.isfinite(block).all(), f"{name}: not finite"
    torch.testing.assert_close(block, block.T, msg=f"{name}: not symmetric")
    assert torch.linalg.eigvalsh(block).min() >= -1e-9 * max(1.0, block.abs().max()), name


def _mismatch(method, blocks, expected, case, sizes):
    """The first block that differs from the method's definition, or None."""
    check = DEFINITIONS[method][1]
    for name, block in blocks.items():
        if name not in expected:
            return f"{name}: a block the reference does not have"
        assert torch.isfinite(block).all(), f"{method}: {name} holds NaN or inf"
        if check == "sampled" or name in case.approximate(check):
            _assert_sane(name, block, sizes[name])
            if (
                check == "eigenbasis"
                and name.startswith("conv.")
                and not torch.allclose(block.trace(), expected[name].trace(), rtol=1e-7, atol=1e-9)
            ):
                return f"{name}: trace {float(block.trace())} != {float(expected[name].trace())}"
            continue
        actual, reference = block, expected[name]
        if check == "diagonal":
            actual, reference = block.diagonal(), reference.diagonal()
        if not torch.allclose(actual, reference, rtol=1e-7, atol=1e-9):
            error = (actual - reference).norm() / reference.norm().clamp(min=1e-12)
            return f"{name}: relative error {float(error):.3g}"
    return None


def _assert_missing_blocks_are_zero_and_named(blocks, expected, messages):
    for name in set(expected) - set(blocks):
        assert torch.count_nonzero(expected[name]) == 0, f"{name}: no block, nonzero reference"
        assert any(re.search(rf"without a block: .*\b{re.escape(name)}\b", m) for m in messages), (
            f"{name} has no block and no warning names it: {messages}"
        )


# -- one example -----------------------------------------------------------------------------
def _batch_size(method, curvature):
    """The method's batch size; the PCH reference (per node and sample) at one sample."""
    return 1 if curvature.startswith("pch") else DEFINITIONS[method][0]


def _refusal_patterns(case, n, method):
    """``(must refuse, pattern a refusal's message must match)`` for this example."""
    must = {"replace_late", "custom_function", "input_modified"} | ({"coupled"} if n > 1 else set())
    causes = [REFUSALS[trap] for trap in case.traps if trap in REFUSALS]
    if DEFINITIONS[method][1] == "sampled":  # a loss without a likelihood to sample from
        causes.append("need a known likelihood")
    return bool(must & set(case.traps)), "|".join(causes) or None


def _check_call(case, cg, method, curvature, call, references, caught, n):
    """Run one curvature call; returns the result to re-check after a later step, or None."""
    must_refuse, pattern = _refusal_patterns(case, n, method)
    label = f"{method}/{curvature} at N={n} with traps {sorted(case.traps)}"
    try:
        curv = call()
        blocks = {name: block.to_dense() for name, block in curv.items()}
    except CurvGraphError as error:
        assert pattern and re.search(pattern, str(error)), f"{label} refused: {error}"
        return None
    assert not must_refuse, f"{label}: answered a call it must refuse"
    sizes = {name: p.numel() for name, p in case.model.named_parameters()}
    errors = [_mismatch(method, blocks, expected, case, sizes) for expected in references]
    assert None in errors, f"{label}: wrong block, {errors}"
    expected = references[errors.index(None)]
    messages = [str(w.message) for w in caught]
    if DEFINITIONS[method][1] != "sampled":
        _assert_missing_blocks_are_zero_and_named(blocks, expected, messages)
    return curv, expected


def _check_batch(case, cg, n, caught):
    model = case.model
    x, y, target = case.data(n)
    out = cg(x)
    loss = case.loss(out, y, target)
    calls = [
        (name, curvature)
        for name, method in registered_methods().items()
        for curvature in sorted(method.curvatures)
        if _batch_size(name, curvature) == n and curvature in case.curvatures
    ]
    curvatures = sorted({curvature for _, curvature in calls})
    references = {c: [case.references(cg, x, y, target, c)] for c in curvatures}
    if {"step_between", "data_replaced"} & case.traps:  # the recorded point or the new one
        tm.step_parameters(model, in_place="step_between" in case.traps)
        for c in curvatures:
            references[c].append(case.references(cg, x, y, target, c))
    if "replace_late" in case.traps:  # a parameter or a submodule
        (tm.swap_module if case.index % 3 == 0 else tm.replace_parameter)(model, case.index)
    if "input_modified" in case.traps:  # a reused input buffer
        x.mul_(2.0)
    kept = []
    for name, curvature in calls:

        def call(curvature=curvature, name=name):
            return cg.curvature(loss, out, curvature=curvature, method=name)

        result = _check_call(case, cg, name, curvature, call, references[curvature], caught, n)
        if result is not None:
            kept.append((name, curvature, *result))
    if "step_after" in case.traps:  # every block is a snapshot of the point it was computed at
        tm.step_parameters(model)
        sizes = {name: p.numel() for name, p in model.named_parameters()}
        for name, curvature, curv, expected in kept:
            blocks = {key: block.to_dense() for key, block in curv.items()}
            error = _mismatch(name, blocks, expected, case, sizes)
            assert error is None, f"{name}/{curvature} changed after an in-place step: {error}"


def _run_example(steps, conv, traps, index, loss_kind, seed, fallback, pch="pch-abs"):
    case = tm.Case(steps, conv, traps, index, loss_kind, seed, pch)
    with warnings.catch_warnings(record=True) as caught, _no_hang():
        warnings.simplefilter("always")
        try:
            cg = curvgraph.trace(case.model, fallback=fallback)
        except CurvGraphError as error:
            assert "custom_function" in traps, f"trace refused: {error}"
            assert re.search(REFUSALS["custom_function"], str(error)), str(error)
            return
        if "replace_param" in traps:  # before the first forward
            tm.replace_parameter(case.model, index)
        if "freeze" in traps:
            tm.freeze_parameter(case.model, index + 1)
        for i, n in enumerate(sorted({batch for batch, _ in DEFINITIONS.values()} | {1})):
            if i == 1 and "swap_module" in traps:  # between two forwards
                tm.swap_module(case.model, index)
            _check_batch(case, cg, n, caught)


# -- the property ----------------------------------------------------------------------------
def test_every_registered_method_has_a_definition_here():
    assert set(registered_methods()) <= set(DEFINITIONS), sorted(registered_methods())


#: one example: the model's steps and stem, the traps around it, the loss, the PCH checked
EXAMPLES = dict(
    steps=st.lists(
        st.tuples(st.sampled_from(tm.STEPS), st.integers(0, 11)), min_size=1, max_size=4
    ),
    conv=st.booleans(),
    traps=st.sets(st.sampled_from(tm.TRAPS), max_size=2),
    index=st.integers(0, 50),
    loss_kind=st.sampled_from(sorted(tm.LOSSES)),
    seed=st.integers(0, 1000),
    fallback=st.booleans(),
    pch=st.sampled_from(["pch-abs", "pch-clip"]),
)
#: every trap at least once in the default run: "steps | traps | loss | options", a step is
#: kind:choice, options among conv (a conv stem), fallback and clip (pch-clip, else pch-abs)
EXPLICIT = [
    "cut_chain:0 residual:1 | step_after | cross_entropy | conv",
    "direct:2 cut_branch:1 concat:3 | replace_param penalty | mse_sum | fallback clip",
    "threshold:5 tied:2 | swap_module coupled | nll_of_log_softmax |",
    "concat:0 cut_chain:2 | step_between | mse_mean | conv clip",
    "residual:3 derived:1 | replace_late freeze | cross_entropy_smoothed_sum |",
    "linear:1 | custom_function | cross_entropy | fallback",
    "linear:1 cut_branch:2 | replace_param step_after | bce_with_logits | conv",
    "residual:0 concat:1 direct:2 threshold:3 | input_modified | cross_entropy | clip",
    "tied:1 derived:2 threshold:3 | swap_module freeze | mse_sum | conv",
]


def _with_explicit_examples(test):
    for spec in EXPLICIT:
        steps, traps, loss_kind, options = (part.split() for part in spec.split("|"))
        steps = [(kind, int(choice)) for kind, choice in (s.split(":") for s in steps)]
        drawn = dict(steps=steps, conv="conv" in options, traps=set(traps), index=7, seed=0)
        drawn.update(loss_kind=loss_kind[0], fallback="fallback" in options)
        test = example(**drawn, pch="pch-clip" if "clip" in options else "pch-abs")(test)
    return test


@settings(
    max_examples=300 if SLOW else 15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(**EXAMPLES)
@_with_explicit_examples
def test_random_models_with_traps_are_right_or_refused(
    steps, conv, traps, index, loss_kind, seed, fallback, pch
):
    _run_example(steps, conv, traps, index, loss_kind, seed, fallback, pch)
