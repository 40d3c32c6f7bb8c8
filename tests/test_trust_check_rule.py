"""A module's rule must compute the module's forward (issue 14: rules that do not).

``check_rule`` compares a rule's derivatives with its *own* function; a rule registered for
a module whose function is not the module's forward passed every piece and gave the
curvature of another op. ``check_rule`` now also compares the function with the module
(``forward``), and the first recorded call of each module node does the same cheaply.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.rules import (
    ElementwiseRule,
    Rule,
    Sample,
    canonical,
    elementwise_rule,
    randn,
    register_rule,
    registered_rules,
    unregister,
)
from curvgraph.testing import check_rule, forward_error

TOLERANCE = 1e-10


class Cube(nn.Module):
    """``y = 2 x^3``: a rule for ``x^3`` has the right derivatives of the wrong op."""

    def forward(self, x):
        return 2 * x**3


class Net(nn.Module):
    """A model with a source line for the Cube call."""

    def __init__(self, activation):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3, 4), activation, nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _cube_rule(scale):
    return dict(
        function=lambda input: scale * input**3,
        first=lambda input: 3 * scale * input**2,
        second=lambda input: 6 * scale * input,
    )


@pytest.fixture
def registered():
    keys = []

    def register(key, rule=None, **kwargs):
        if rule is None:
            elementwise_rule(key, **kwargs)
        else:
            register_rule(key)(rule)
        keys.append(key)

    yield register
    for key in keys:
        unregister(key)


def test_check_rule_finds_a_rule_that_does_not_compute_its_module(registered):
    registered(Cube, **_cube_rule(1.0))
    errors = check_rule(Cube)
    assert errors["forward"] > 0.1, errors  # |x^3 - 2 x^3| / max(1, |2 x^3|)
    assert max(e for piece, e in errors.items() if piece != "forward") < TOLERANCE
    assert check_rule(Cube())["forward"] > 0.1  # a module instance: its class's rule
    rule = curvgraph.rules.lookup_rule(Cube)
    assert check_rule(rule)["forward"] > 0.1  # the rule itself: the module keys it serves


def test_first_forward_refuses_a_rule_that_does_not_compute_its_module(registered):
    registered(Cube, **_cube_rule(1.0))
    model = Net(Cube())
    cg = curvgraph.trace(model)
    with pytest.raises(curvgraph.CurvGraphError) as caught:
        cg(torch.randn(5, 3))
    message = str(caught.value)
    assert "the rule registered for Cube does not compute the module's forward" in message
    assert "max difference" in message and "node 'act'" in message
    assert "test_trust_check_rule.py" in message  # the user's source line
    with pytest.raises(curvgraph.CurvGraphError, match="registered for Cube"):
        cg(torch.randn(5, 3))  # still refused: a failed check is not remembered as done


def test_a_correct_module_rule_passes_both_and_gives_the_hessian(registered):
    registered(Cube, **_cube_rule(2.0))
    errors = check_rule(Cube)
    assert errors["forward"] < TOLERANCE and max(errors.values()) < TOLERANCE, errors
    torch.manual_seed(0)
    model = Net(Cube()).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    cg = curvgraph.trace(model)
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian")
    params = dict(model.named_parameters())
    exact = torch.func.hessian(
        lambda w: F.cross_entropy(
            torch.func.functional_call(model, {**params, "fc1.weight": w}, (x,)), y
        )
    )(params["fc1.weight"].detach())
    torch.testing.assert_close(curv["fc1.weight"].to_dense(), exact.reshape(12, 12))


def test_the_first_call_of_each_node_and_mode_is_checked_once(registered):
    calls = []

    def function(input):
        calls.append(1)
        return 2 * input**3

    registered(
        Cube, function=function, **{k: v for k, v in _cube_rule(2.0).items() if k != "function"}
    )
    model = Net(Cube())
    cg = curvgraph.trace(model)
    for _ in range(3):
        cg(torch.randn(5, 3))
    assert len(calls) == 1
    model.eval()  # another mode: one more comparison (BatchNorm's rule has two branches)
    cg(torch.randn(5, 3))
    cg(torch.randn(5, 3))
    assert len(calls) == 2
    curvgraph.trace(model)(torch.randn(5, 3))  # a new graph checks again
    assert len(calls) == 3


def test_a_per_sample_call_is_checked_on_its_first_sample_and_a_batch_one_whole(registered):
    """The check costs one sample's output; BatchNorm in training mode mixes: whole batch."""
    batches = []

    def function(input):
        batches.append(input.shape[0])
        return 2 * input**3

    registered(
        Cube, function=function, **{k: v for k, v in _cube_rule(2.0).items() if k != "function"}
    )
    cg = curvgraph.trace(Net(Cube()))
    cg(torch.randn(5, 3))
    assert batches == [1]
    norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    calls = []
    rule = curvgraph.rules.lookup_rule(nn.BatchNorm1d)
    original = rule.call

    def counted(arguments):
        calls.append(arguments["input"].shape[0])
        return original(arguments)

    rule.call = counted
    try:
        curvgraph.trace(norm)(torch.randn(5, 3))
        norm.eval()
        curvgraph.trace(norm)(torch.randn(5, 3))
    finally:
        del rule.call
    assert calls == [5, 1]


def test_a_function_that_fails_on_one_sample_is_compared_on_the_whole_batch(registered):
    """Where the first sample's call raises (or differs), the whole batch decides."""

    def function(input):  # raises on one sample: the whole batch is compared, and agrees
        if input.shape[0] == 1:
            raise RuntimeError("needs the batch")
        return 2 * input**3

    registered(
        Cube, function=function, **{k: v for k, v in _cube_rule(2.0).items() if k != "function"}
    )
    out = curvgraph.trace(Net(Cube()))(torch.randn(5, 3))
    assert out.shape == (5, 2)


class LogScale(nn.Module):
    """Needs constructor arguments: ``check_rule`` gets the module through ``module=``."""

    def __init__(self, features):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        return x * self.log_scale.exp()


def _log_scale_rule(function):
    class LogScaleRule(Rule):
        name = "log_scale"
        differentiable = ("input", "log_scale")

        def jvp(self, ctx, tangents):
            e = ctx.log_scale.exp()
            out = 0
            if "input" in tangents:
                out = out + e * tangents["input"]
            if "log_scale" in tangents:
                out = out + ctx.input * e * tangents["log_scale"][:, None, :]
            return out

        def vjp(self, ctx, cotangent, slots):
            e = ctx.log_scale.exp()
            result = {}
            if "input" in slots:
                result["input"] = cotangent * e
            if "log_scale" in slots:
                result["log_scale"] = cotangent * ctx.input * e
            return result

        def samples(self):
            return [
                Sample((randn(3, 4), randn(4, seed=1))),
                Sample((randn(2, 4, seed=2), randn(4, seed=3))),
            ]

    LogScaleRule.function, LogScaleRule.signature = canonical(function)
    return LogScaleRule()


def _exp_scale(input, log_scale):
    return input * log_scale.exp()


def _linear_scale(input, log_scale):
    return input * (1 + log_scale)  # right at log_scale = 0 only


def test_modules_that_need_arguments_are_given_as_instance_or_factory(registered):
    registered(LogScale, _log_scale_rule(_exp_scale))
    with pytest.warns(UserWarning, match=r"LogScale\(\) cannot be built.*module="):
        errors = check_rule(LogScale)
    assert "forward" not in errors and errors["jvp"] < TOLERANCE  # (no residual here)
    for module in (LogScale(4), lambda: LogScale(4)):
        errors = check_rule(LogScale, module=module)
        assert errors["forward"] < TOLERANCE, errors
    assert check_rule(LogScale(4))["forward"] < TOLERANCE
    instance = LogScale(4)
    check_rule(instance)
    assert torch.equal(instance.log_scale, torch.zeros(4))  # compared on a copy


def test_sample_parameters_are_loaded_into_the_module(registered):
    """``x (1 + s)`` equals the module at its initial ``s = 0``: the samples' ``s`` differ."""
    registered(LogScale, _log_scale_rule(_linear_scale))
    assert check_rule(LogScale, module=LogScale(4))["forward"] > 1e-3
    model = Net(LogScale(4))
    curvgraph.trace(model)(torch.randn(2, 3))  # at s = 0 the recorder cannot tell
    with torch.no_grad():
        model.act.log_scale.normal_()
    with pytest.raises(curvgraph.CurvGraphError, match="registered for LogScale"):
        curvgraph.trace(model)(torch.randn(2, 3))


def test_a_function_of_the_wrong_shape_is_refused(registered):
    registered(
        Cube,
        function=lambda input: input.sum(-1),
        first=lambda input: input,
        second=lambda input: input,
    )
    with pytest.raises(AssertionError, match="forward of Cube.*shape"):
        forward_error(curvgraph.rules.lookup_rule(Cube), Sample((randn(3, 4),)), Cube)
    with pytest.raises(curvgraph.CurvGraphError, match=r"returns \(5,\) where the module"):
        curvgraph.trace(Net(Cube()))(torch.randn(5, 3))


def test_rules_without_module_spellings_keep_their_results():
    rule = ElementwiseRule(
        "unregistered_tanh",
        lambda input: torch.tanh(input),
        lambda input: 1 - torch.tanh(input) ** 2,
        lambda input: input,
    )
    samples = [Sample((randn(3, 4),)), Sample((randn(2, 5, seed=1),))]
    errors = check_rule(rule, samples)
    assert "forward" not in errors
    assert errors["jvp"] < TOLERANCE
    with pytest.raises(ValueError, match="no function"):
        check_rule(curvgraph.rules.lookup_rule(nn.Flatten), module=nn.Flatten())


# -- every built-in module rule computes its module ------------------------------------------
def _module_keys():
    for rule, keys in registered_rules().items():
        for key in keys:
            if isinstance(key, type) and issubclass(key, nn.Module) and rule.function is not None:
                yield rule, key


def _constructible(cls):
    try:
        cls()
    except Exception:
        return False
    return True


BUILT = sorted(
    {key for _, key in _module_keys() if _constructible(key)}, key=lambda c: c.__qualname__
)


@pytest.mark.parametrize("cls", BUILT, ids=lambda c: c.__qualname__)
def test_builtin_modules_built_without_arguments_compute_their_rule(cls):
    errors = check_rule(cls)
    assert "forward" in errors and errors["forward"] < TOLERANCE, errors


#: torch's modules that need constructor arguments; the samples set every canonical attribute
FACTORIES = {
    nn.Linear: lambda: nn.Linear(1, 1),
    nn.Conv1d: lambda: nn.Conv1d(1, 1, 1),
    nn.Conv2d: lambda: nn.Conv2d(1, 1, 1),
    nn.Conv3d: lambda: nn.Conv3d(1, 1, 1),
    nn.ConvTranspose1d: lambda: nn.ConvTranspose1d(1, 1, 1),
    nn.ConvTranspose2d: lambda: nn.ConvTranspose2d(1, 1, 1),
    nn.ConvTranspose3d: lambda: nn.ConvTranspose3d(1, 1, 1),
    nn.BatchNorm1d: lambda: nn.BatchNorm1d(1),
    nn.BatchNorm2d: lambda: nn.BatchNorm2d(1),
    nn.LayerNorm: lambda: nn.LayerNorm(1),
    nn.GroupNorm: lambda: nn.GroupNorm(1, 1),
    nn.Embedding: lambda: nn.Embedding(1, 1),
    nn.MaxPool1d: lambda: nn.MaxPool1d(1),
    nn.MaxPool2d: lambda: nn.MaxPool2d(1),
    nn.MaxPool3d: lambda: nn.MaxPool3d(1),
    nn.AvgPool1d: lambda: nn.AvgPool1d(1),
    nn.AvgPool2d: lambda: nn.AvgPool2d(1),
    nn.AvgPool3d: lambda: nn.AvgPool3d(1),
    nn.AdaptiveAvgPool1d: lambda: nn.AdaptiveAvgPool1d(1),
    nn.AdaptiveAvgPool2d: lambda: nn.AdaptiveAvgPool2d(1),
    nn.AdaptiveAvgPool3d: lambda: nn.AdaptiveAvgPool3d(1),
    nn.AdaptiveMaxPool1d: lambda: nn.AdaptiveMaxPool1d(1),
    nn.AdaptiveMaxPool2d: lambda: nn.AdaptiveMaxPool2d(1),
    nn.ConstantPad1d: lambda: nn.ConstantPad1d(1, 0.0),
    nn.ConstantPad2d: lambda: nn.ConstantPad2d(1, 0.0),
    nn.ConstantPad3d: lambda: nn.ConstantPad3d(1, 0.0),
    nn.ZeroPad1d: lambda: nn.ZeroPad1d(1),
    nn.ZeroPad2d: lambda: nn.ZeroPad2d(1),
    nn.PixelShuffle: lambda: nn.PixelShuffle(1),
    nn.PixelUnshuffle: lambda: nn.PixelUnshuffle(1),
    nn.Threshold: lambda: nn.Threshold(0.0, 0.0),
}
NEEDING_ARGUMENTS = sorted(
    [(rule, key) for rule, key in _module_keys() if key in FACTORIES],
    key=lambda pair: pair[1].__qualname__,
)


@pytest.mark.parametrize(
    "rule, cls", NEEDING_ARGUMENTS, ids=lambda x: getattr(x, "__qualname__", "")
)
def test_builtin_modules_with_arguments_compute_their_rule(rule, cls):
    # samples written for the function spelling (a 2-d F.batch_norm input) may not fit
    errors = [forward_error(rule, s, FACTORIES[cls], strict=False) for s in rule.samples()]
    compared = [e for e in errors if e is not None]
    assert compared, f"no sample of {rule.name} is a call of {cls.__qualname__}"
    assert max(compared) < TOLERANCE, errors


def test_batch_norm_in_training_mode_updates_its_statistics_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3)
    out = curvgraph.trace(model)(x)
    torch.testing.assert_close(out, reference(x))
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    assert int(model[1].num_batches_tracked) == 1


class Noise(nn.Module):
    """A random module whose rule draws alike: the check replays the random state."""

    def forward(self, x):
        return x + torch.randn_like(x)


def _noise(input):
    return input + torch.randn_like(input)


def test_random_modules_are_compared_from_the_same_random_state(registered):
    registered(Noise, function=_noise, first=torch.ones_like, second=torch.zeros_like)
    model = Net(Noise())
    x = torch.randn(5, 3)
    torch.manual_seed(1)
    out, after = curvgraph.trace(model)(x), torch.rand(3)
    torch.manual_seed(1)
    expected, expected_after = model(x), torch.rand(3)
    torch.testing.assert_close(out, expected)  # the model's random stream is untouched
    torch.testing.assert_close(after, expected_after)
    rule = curvgraph.rules.lookup_rule(Noise)  # (its derivatives cannot be vmapped)
    assert forward_error(rule, Sample((randn(3, 4),)), Noise) < TOLERANCE


def test_random_builtin_modules_in_training_mode_are_not_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Dropout(0.3), nn.Linear(4, 2))
    cg = curvgraph.trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cg(torch.randn(6, 3))
    assert out.shape == (6, 2)


@pytest.mark.parametrize("module", [nn.ELU(inplace=True), nn.LeakyReLU(0.1, inplace=True)])
def test_inplace_modules_keep_their_inputs(module):
    # rules that read their input (ReLU's reads its output: its input is value-free, and a
    # slim record keeps no copy of it, tests/test_slim_record.py)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), module, nn.Linear(4, 2))
    x = torch.randn(5, 3)
    cg = curvgraph.trace(model)
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    recorded = next(c for c in cg.record.contexts.values() if c.module is model[1])
    assert (recorded.input < 0).any()  # the recorded input is not overwritten


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


@pytest.mark.parametrize("broken", [False, True])
def test_nan_outputs_are_equal_only_where_both_are_nan(registered, broken):
    def function(input):
        out = torch.log(input)
        return torch.where(input > 0, torch.nan, out) if broken else out

    registered(Log, function=function, first=lambda input: 1 / input, second=lambda input: input)
    cg = curvgraph.trace(Net(Log()))
    x = torch.randn(6, 3)
    if broken:
        with pytest.raises(curvgraph.CurvGraphError, match="max difference inf"):
            cg(x)
    else:
        assert cg(x).isnan().any()
