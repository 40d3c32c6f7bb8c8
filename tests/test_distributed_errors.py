"""A check that fails on one rank fails on every rank, with one error, before any collective.

Two gloo ranks (spawned, float64) make the same curvature calls; in each case rank 1 alone
is wrong: an empty shard with a mean loss (PyTorch's mean over 0 samples is NaN), NaN in
its outputs, a NaN loss with finite outputs, a loss that couples samples, other parameters
(another seed), another traced graph (another activation), another method. Each rank must
raise the same error (type and message) naming rank 1 and the cause, and afterwards the
ranks must still be in lockstep (a correct call succeeds on both). The process group has a
short timeout, so a rank left waiting in a collective fails the test in seconds instead of
hanging it.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
import curvgraph.methods.ranks as ranks_module
from curvgraph import CurvGraphError
from curvgraph.distributed import (
    RankError,
    RankFloatingPointError,
    RankValueError,
    all_reduce_gradients,
)
from curvgraph.losses import LossStructureError
from curvgraph.rank_state import CHECKSUM_RTOL

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

DTYPE = torch.float64
#: a rank waiting in a collective of a call for longer than this fails (a regression must
#: fail in seconds, not hang); the ranks' calls take well under a second each
TIMEOUT = datetime.timedelta(seconds=20)
#: the rendezvous waits longer: the spawned ranks may start seconds apart on a loaded machine
START_TIMEOUT = datetime.timedelta(seconds=120)


def make_model(seed=0, activation=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), activation(), nn.Linear(5, 3)).to(DTYPE)


def make_batch(rank, size=4):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(size, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (size,), generator=g)


def empty_shard(rank, group, method="hbp"):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank, size=4 if rank == 0 else 0)
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method=method, process_group=group)


def nan_outputs(rank, group):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    if rank == 1:
        x[2, 1] = float("nan")
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="kflr", process_group=group)


def nan_loss(rank, group):
    cg = curvgraph.trace(make_model())
    x, _ = make_batch(rank)
    out = cg(x)
    target = torch.zeros_like(out)
    if rank == 1:
        target[0, 0] = float("nan")  # finite outputs, NaN loss
    return cg.curvature(F.mse_loss(out, target), out, method="exact", process_group=group)


def coupled_loss(rank, group):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    out = cg(x)
    loss = out.sum() ** 2 if rank == 1 else F.cross_entropy(out, y)
    return cg.curvature(loss, out, method="diag", process_group=group)


def other_parameters(rank, group):
    cg = curvgraph.trace(make_model(seed=rank))
    x, y = make_batch(rank)
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="exact", process_group=group)


def other_graph(rank, group):
    cg = curvgraph.trace(make_model(activation=nn.Tanh if rank == 0 else nn.Sigmoid))
    x, y = make_batch(rank)
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="hbp", process_group=group)


def other_method(rank, group):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    out = cg(x)
    method = "hbp" if rank == 0 else "kflr"
    return cg.curvature(F.cross_entropy(out, y), out, method=method, process_group=group)


def empty_backward_hessian(rank, group):
    cg = curvgraph.trace(make_model())
    x, _ = make_batch(rank, size=4 if rank == 0 else 0)
    cg(x)
    hessian = torch.eye(3, dtype=DTYPE)  # an output Hessian the user formed
    return cg.backward_hessian(hessian, curvature="ggn", process_group=group)


def correct_call(rank, group):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, method="exact", process_group=group)
    return curv.to_dense()


def other_reduction(rank, group):
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    out = cg(x)
    loss = (out**4).sum()  # no closed form: its reduction is not checked locally
    reduction = "sum" if rank == 0 else "mean"
    return cg.curvature(loss, out, method="diag", process_group=group, loss_reduction=reduction)


def empty_gradients(rank, group):
    model = make_model()
    x, y = make_batch(rank, size=4 if rank == 0 else 0)
    F.cross_entropy(model(x), y, reduction="sum").backward()  # rank 1: zero gradients
    all_reduce_gradients(model.parameters(), x.shape[0], group, loss_reduction="sum")


def missing_gradients(rank, group):
    model = make_model()
    x, y = make_batch(rank)
    if rank == 0:  # rank 1 forgot its backward pass
        F.cross_entropy(model(x), y).backward()
    all_reduce_gradients(model.parameters(), x.shape[0], group)


def both_fail(rank, group):
    """Rank 0: NaN outputs; rank 1: an empty shard."""
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank, size=4 if rank == 0 else 0)
    if rank == 0:
        x[0, 0] = float("nan")
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="kflr", process_group=group)


def other_sequence_length(rank, group, method="hbp"):
    """Outputs [N, T, 3] with T = 2 on rank 0, 3 on rank 1: HBP's output Hessians differ."""
    cg = curvgraph.trace(make_model())
    x = make_batch(rank)[0].unsqueeze(1).expand(-1, 2 + rank, -1)
    out = cg(x)
    loss = F.mse_loss(out, torch.zeros_like(out), reduction="sum")
    return cg.curvature(loss, out, method=method, process_group=group, loss_reduction="sum")


def product_after_update(rank, group):
    """Exact blocks computed together; rank 1 then reuses its input buffer in place."""
    cg = curvgraph.trace(make_model())
    x, y = make_batch(rank)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, method="exact", process_group=group)
    if rank == 1:
        x.mul_(2.0)  # the next batch loaded into the same buffer, on one rank only
    return curv.matvec({n: torch.ones_like(p) for n, p in cg.model.named_parameters()})


CASES = {
    "empty shard, hbp": empty_shard,
    "empty shard, sqrt": lambda rank, group: empty_shard(rank, group, "sqrt"),
    "empty shard, backward_hessian": empty_backward_hessian,
    "NaN outputs": nan_outputs,
    "NaN loss": nan_loss,
    "coupled loss": coupled_loss,
    "other parameters": other_parameters,
    "other graph": other_graph,
    "other method": other_method,
    "other loss_reduction": other_reduction,
    "empty shard, all_reduce_gradients": empty_gradients,
    "no gradients, all_reduce_gradients": missing_gradients,
    "ranks 0 and 1": both_fail,
    "other sequence length, hbp": other_sequence_length,
    "other sequence length, kfra": lambda rank, group: other_sequence_length(rank, group, "kfra"),
    "product after an in-place input on one rank": product_after_update,
}


def outcome(function, rank, group):
    """What the call raised: type, message, agreed attributes and the local cause's type."""
    try:
        function(rank, group)
    except Exception as error:  # noqa: BLE001 (every outcome is compared)
        cause = error.__cause__
        return {
            "type": type(error),
            "message": str(error),
            "ranks": getattr(error, "ranks", None),
            "cause": getattr(error, "cause", None),
            "original": None if cause is None else type(cause),
        }
    return None


def _worker(rank, port, directory):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=START_TIMEOUT,
    )
    try:
        group = dist.new_group(timeout=TIMEOUT)  # the calls' group: a short timeout
        results = {name: outcome(case, rank, group) for name, case in CASES.items()}
        results["afterwards"] = correct_call(rank, group)  # still in lockstep
        torch.save(results, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _worker, args=(port, str(directory)), nprocs=2, start_method="spawn"
    )
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]


# (case, error type, cause, words of the message, the failing rank's own error)
EXPECTED = [
    ("empty shard, hbp", RankError, "its batch is empty", ["shape (0, 3)"], CurvGraphError),
    ("empty shard, sqrt", RankError, "its batch is empty", ["0 samples"], CurvGraphError),
    ("empty shard, backward_hessian", RankError, "its batch is empty", ["(0, 3)"], CurvGraphError),
    ("NaN outputs", RankFloatingPointError, "NaN or inf", ["3 of the 12"], FloatingPointError),
    ("NaN loss", RankFloatingPointError, "not finite", ["the loss is nan"], FloatingPointError),
    ("coupled loss", RankValueError, "per-sample terms", ["PowBackward0"], LossStructureError),
    ("other parameters", RankError, "its parameters differ", ["same model"], None),
    ("other graph", RankError, "traced graph differs", ["same model"], None),
    ("other method", RankError, "another call", ["same calls in the same order"], None),
    ("other loss_reduction", RankError, "another call", ["loss_reduction"], None),
    ("other sequence length, hbp", RankError, "another call", ["size per sample"], None),
    ("other sequence length, kfra", RankError, "another call", ["size per sample"], None),
    ("empty shard, all_reduce_gradients", RankError, "batch is empty", ["0 samples"], None),
    ("no gradients, all_reduce_gradients", RankError, "refused", ["loss.backward()"], None),
]


@pytest.mark.parametrize(
    "case, kind, cause, words, original", EXPECTED, ids=[e[0] for e in EXPECTED]
)
def test_every_rank_raises_the_same_error(ranks, case, kind, cause, words, original):
    first, second = (results[case] for results in ranks)
    assert first is not None and second is not None, (case, first, second)
    for result in (first, second):
        assert result["type"] is kind, (case, result)
        assert issubclass(result["type"], CurvGraphError)
        for category in (ValueError, FloatingPointError):  # what the failing rank raised
            assert issubclass(result["type"], category) == issubclass(original or int, category)
        assert result["ranks"] == (1,), (case, result)
        assert cause in result["cause"], (case, result)
        message = result["message"]
        assert message.startswith("rank 1 of 2 cannot take part in this curvature call")
        assert cause in message, (case, message)
        for word in words:
            assert word in message, (case, word, message)
        assert "rank 0" not in message.split(":")[0]
    assert first["message"] == second["message"]
    assert first["original"] is None  # rank 0 had no error of its own
    if original is not None:
        assert issubclass(second["original"], original), (case, second)


def test_failures_on_several_ranks_are_listed_on_every_rank(ranks):
    first, second = (results["ranks 0 and 1"] for results in ranks)
    assert first["message"] == second["message"]
    lines = first["message"].splitlines()
    assert lines[0].startswith("ranks 0, 1 of 2 cannot take part in this curvature call")
    assert lines[1].startswith("  rank 0: its outputs contain NaN or inf")
    assert lines[2].startswith("  rank 1: its batch is empty")
    for result in (first, second):  # the type of the first failing rank's error
        assert result["type"] is RankFloatingPointError and result["ranks"] == (0, 1)
    assert first["original"] is FloatingPointError and second["original"] is CurvGraphError


def test_ranks_stay_in_lockstep_after_the_errors(ranks):
    single = correct_single()
    for results in ranks:
        torch.testing.assert_close(results["afterwards"], single, rtol=1e-12, atol=1e-14)


def correct_single():
    """One process on the concatenated batch (the reference for the ranks' last call)."""
    cg = curvgraph.trace(make_model())
    x, y = (torch.cat(parts) for parts in zip(make_batch(0), make_batch(1)))
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="exact").to_dense()


def test_checksum_equals_float64_sums_chunked_or_not(monkeypatch):
    torch.manual_seed(0)
    tensors = [torch.randn(1000), torch.randn(37, 3, dtype=torch.float32), torch.randn(1)]
    flats = [t.reshape(-1).double() for t in tensors]
    expected = torch.tensor(
        [
            sum(f.numel() for f in flats),
            sum(float(f.sum()) for f in flats),
            sum(float(f @ f) for f in flats),
            sum((i + 1) * float(f[:-1] @ f[1:]) for i, f in enumerate(flats)),
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ranks_module.checksum(tensors, "cpu"), expected, rtol=1e-13, atol=0)
    monkeypatch.setattr(ranks_module, "CHECKSUM_CHUNK", 7)  # pairs across chunk borders
    torch.testing.assert_close(ranks_module.checksum(tensors, "cpu"), expected, rtol=1e-13, atol=0)
    swapped = tensors[0].clone()
    swapped[[3, 500]] = swapped[[500, 3]]  # same sum and squares, other neighbours
    changed = ranks_module.checksum([swapped, *tensors[1:]], "cpu")
    assert abs(float(changed[3] - expected[3])) > 1e3 * CHECKSUM_RTOL * float(expected.abs().max())
    reordered = ranks_module.checksum([tensors[1], tensors[0], tensors[2]], "cpu")
    assert not torch.allclose(reordered, expected, rtol=1e-6)


def test_a_product_refused_on_one_rank_raises_on_every_rank(ranks):
    """The products of exact blocks are collectives: a refusal on one rank is agreed on."""
    first, second = (results["product after an in-place input on one rank"] for results in ranks)
    for result in (first, second):
        assert result is not None and result["type"] is RankError, result
        assert result["ranks"] == (1,), result
        assert result["message"].startswith("rank 1 of 2 could not compute its product")
        assert "modified in place" in result["message"], result["message"]
    assert second["original"] is not None and issubclass(second["original"], CurvGraphError)
