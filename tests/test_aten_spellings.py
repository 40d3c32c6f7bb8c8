"""Every ATen spelling of the export capture computes what the ATen overload computes.

Generated from ``ATEN_SPELLINGS``: each overload is called with the first candidate argument
list it accepts (explicit samples for rewrites whose arguments differ), then the rewritten
call (``target(*args, **kwargs)``, or ``args[0].<method>(...)``) must give the same value.
"""

from __future__ import annotations

import operator

import pytest
import torch

from curvgraph.tracing.aten import ATEN_SPELLINGS

aten = torch.ops.aten


def x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


W, IDS = x(7, 3), torch.tensor([[0, 3, 6], [1, 1, 2]])
MEAN, VAR = x(3, seed=1), x(3, seed=2).abs() + 0.5

#: overloads whose rewrite reorders or renames arguments: explicit calls
SAMPLES = {
    aten.embedding.default: [(W, IDS), (W, IDS, 1)],
    aten.layer_norm.default: [(x(2, 4, 3), [3], x(3, seed=1), x(3, seed=2), 1e-5, True)],
    aten.batch_norm.default: [
        (x(4, 3), x(3, seed=3), x(3, seed=4), MEAN, VAR, False, 0.1, 1e-5, False)
    ],
    aten.dropout.default: [(x(3, 4), 0.5, False), (x(3, 4), 0.0, True)],
    aten.slice.Tensor: [
        (x(3, 5, 4), 1, 1, 4),
        (x(3, 5, 4), -1, 0, 2**63 - 1, 2),
        (x(3, 5, 4), 0, 1),
        (x(3, 5), 1, None, -1),
    ],
    aten.select.int: [(x(3, 5, 4), 1, 2), (x(3, 5, 4), -1, 0), (x(3, 5), 0, -1)],
    aten.t.default: [(x(3, 5),)],
    aten.to.dtype: [(x(3, 2), torch.float32)],
    aten.to.dtype_layout: [(x(3, 2),)],
    aten.to.device: [(x(3, 2), torch.device("cpu"), torch.float32)],
    aten._to_copy.default: [(x(3, 2),)],
    aten.sym_size.int: [(x(3, 2), 1)],
    aten.expand.default: [(x(3, 1), [3, 4])],
    aten.view.default: [(x(3, 4), [4, 3])],
    aten._unsafe_view.default: [(x(3, 4), [2, 6])],
    aten.reshape_as.default: [(x(3, 4), x(12, 1))],
    aten.reshape.default: [(x(3, 4), [2, 6])],
    aten.div.Tensor_mode: [(x(3, 4), x(3, 4, seed=1))],
    aten.div.Scalar_mode: [(x(3, 4), 0.3)],
    aten.view_as.default: [(x(3, 4), x(2, 6))],
}
KWARGS = {
    aten.div.Tensor_mode: {"rounding_mode": "floor"},
    aten.div.Scalar_mode: {"rounding_mode": "trunc"},
    aten.to.dtype_layout: {"dtype": torch.float32, "layout": torch.strided},
    aten._to_copy.default: {"dtype": torch.float32},
}

#: generic candidates, tried in order: the first the overload accepts is compared
CANDIDATES = [
    (x(3, 4),),
    (x(3, 4), x(3, 4, seed=1)),
    (x(3, 4).abs() + 0.1, 2.0),
    (x(3, 4), 1),
    (x(3, 4), [1]),
    (x(3, 4), [1], True),
    (x(3, 4), 0, 1),
    (x(3, 4), 1, True),
    (x(2, 3, 4), [0, 2, 1]),
    ([x(3, 4), x(3, 4, seed=1)], 1),
    (x(3, 4), 2, 1),
    (x(3, 4), 1, torch.tensor([[0, 1], [2, 3], [1, 1]])),
    (x(3, 4) > 0, x(3, 4), x(3, 4, seed=1)),
    (x(3, 4), x(3, 4) > 0, 0.5),
    (x(3, 4), -0.5, 0.5),
    (x(3, 4), x(4, 5)),
    (x(2, 3, 4), x(2, 4, 5)),
    (x(5), x(3, 4), x(4, 5)),
    (x(2, 3, 5), x(2, 3, 4), x(2, 4, 5)),
    (x(2, 4, 5), x(3, 5), x(3)),
    (x(1, 2, 6, 6), x(3, 2, 3, 3)),
    (x(1, 2, 6), x(3, 2, 3)),
    (x(1, 2, 6, 6), [3, 3]),
    (x(1, 2, 6, 6), [2, 2]),
    (x(2, 2, 3, 4), x(2, 2, 5, 4), x(2, 2, 5, 4)),
    (x(2, 3) > 0, x(2, 3) > 0.5),
    (x(3, 4), 1, [2, 2]),
    (x(3, 4), [2, 2], 1),
    (x(3, 4), 1, torch.tensor([0, 2])),
    (x(3, 4), x(3, 4) > 0, torch.tensor(0.5, dtype=torch.float64)),
    (x(3, 4) > 0, 1.0, x(3, 4)),
    (x(3, 4) > 0, x(3, 4), 1.0),
    (x(3, 4) > 0, 1.0, 2.0),
]


def call(target, args, kwargs):
    if isinstance(target, str):
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def copies(args):
    return tuple(
        a.clone() if isinstance(a, torch.Tensor) else copies(a) if isinstance(a, list) else a
        for a in args
    )


def argument_lists(overload):
    if overload in SAMPLES:
        return [(args, KWARGS.get(overload, {})) for args in SAMPLES[overload]]
    for args in CANDIDATES:
        try:
            overload(*copies(args))
        except Exception:
            continue
        return [(args, {})]
    return []


def same(a, b):
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, 0, 0, True)
    return a == b


@pytest.mark.parametrize("overload", list(ATEN_SPELLINGS), ids=str)
def test_spelling_computes_the_overload(overload):
    cases = argument_lists(overload)
    if not cases:
        pytest.skip(f"no generic argument list fits {overload}")
    for args, kwargs in cases:
        torch.manual_seed(0)
        expected = overload(*copies(args), **kwargs)  # copies: in-place ops (add_) change them
        target, new_args, new_kwargs = ATEN_SPELLINGS[overload](copies(args), kwargs)
        torch.manual_seed(0)
        actual = call(target, new_args, new_kwargs)
        assert same(actual, expected), (overload, target, args)


def test_most_spellings_are_checked_here():
    checked = [o for o in ATEN_SPELLINGS if argument_lists(o)]
    assert len(checked) >= 0.8 * len(ATEN_SPELLINGS), sorted(
        str(o) for o in ATEN_SPELLINGS if o not in checked
    )


def test_a_slice_is_an_index_of_getitem():
    target, args, _ = ATEN_SPELLINGS[aten.slice.Tensor]((x(2, 3), 1, 0, 2), {})
    assert target is operator.getitem and args[1] == (slice(None), slice(None, 2, None))
