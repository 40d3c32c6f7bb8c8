"""Data-parallel curvature (``process_group=...``): 2 gloo ranks on the CPU, float64.

One batch of 8 samples is split unevenly over 2 ranks (3 and 5 samples; 4 and 4 for the
``DistributedDataParallel`` recipe). Every rank must get, for every method, the blocks one
process computes on the concatenated batch (dense blocks compared to ``1e-12``), the ranks
must agree with each other, and one ``CGNewton`` step must equal the single-process step.
Lanczos and Hutch++ on exact (implicit) blocks, whose every product is a collective, must
equal the single-process results for the same seed.
Monte-Carlo KFAC is compared in distribution: its ``A`` factor exactly, its ``G`` factor
against KFLR's within the Monte-Carlo error (4000 samples per input).

All ranks' work runs in one ``torch.multiprocessing.spawn`` (a module-scoped fixture; spawn,
not fork, as autograd may have run in the test process); the single-process references run
in the test process.
"""

from __future__ import annotations

import datetime
import functools
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.distributed import all_reduce_gradients

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

DTYPE = torch.float64
SPLIT = (3, 5)
EVEN_SPLIT = (4, 4)
MC_SAMPLES = 4000
#: a rank left waiting in a collective fails after this (gloo's default: 30 minutes)
TIMEOUT = datetime.timedelta(seconds=120)

# (model, loss, loss_reduction)
CASES = {
    "mlp_ce_mean": ("mlp", F.cross_entropy, "mean"),
    "cnn_mse_sum": ("cnn", functools.partial(F.mse_loss, reduction="sum"), "sum"),
}
# (method, curvature, options)
CONFIGS = {
    "mlp_ce_mean": [
        ("hbp", "ggn", {}),
        ("hbp", "hessian", {}),
        ("hbp", "pch-abs", {}),
        ("hbp", "hessian", {"average_input_jac": False, "average_param_jac": False}),
        ("kfra", "ggn", {}),
        ("exact", "hessian", {}),
        ("exact", "pch-clip", {}),
        ("sqrt", "ggn", {}),
        ("diag", "ggn", {}),
        ("kflr", "ggn", {}),
    ],
    "cnn_mse_sum": [
        ("hbp", "ggn", {"average_input_jac": False}),
        ("exact", "ggn", {}),
        ("diag", "ggn", {}),
        ("kflr", "ggn", {}),
    ],
}


def make_model(name):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)
        )
    return model.to(DTYPE)


def make_batch(name):
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return torch.randn(8, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (8,), generator=g)
    return torch.randn(8, 1, 5, 5, generator=g, dtype=DTYPE), torch.randn(
        8, 2, generator=g, dtype=DTYPE
    )


def local(tensor, rank, split):
    """This rank's samples (``rank=None``: the whole batch)."""
    if rank is None:
        return tensor
    start = sum(split[:rank])
    return tensor[start : start + split[rank]]


def compute(group=None, rank=None):
    """Every block and step, on this rank's samples (``group=None``: one process, all)."""
    results = {}
    for case, (model_name, loss_fn, reduction) in CASES.items():
        model = make_model(model_name)
        x, y = (local(t, rank, SPLIT) for t in make_batch(model_name))
        cg = curvgraph.trace(model)
        out = cg(x)
        loss = loss_fn(out, y)
        options = {} if group is None else {"process_group": group, "loss_reduction": reduction}
        for method, curvature, extra in CONFIGS[case]:
            curv = cg.curvature(loss, out, curvature, method, **extra, **options)
            results[(case, method, curvature, str(extra))] = curv.to_dense()
            if method == "exact":  # analysis by products: every product is a collective
                results[(case, "lanczos", curvature)] = curv.top_eigenvalues(
                    3, per_block=False, generator=0
                )
                results[(case, "hutch++", curvature)] = curv.trace_estimate(30, generator=0).total
        hessian = curvgraph.loss_hessian(loss, out)
        curv = cg.backward_hessian(hessian, curvature="pch-clip", loss=loss, **options)
        results[(case, "backward_hessian")] = curv.to_dense()
    results.update(kfac_factors(group, rank))
    results.update(newton_steps(group, rank))
    return results


def kfac_factors(group, rank):
    model = make_model("mlp")
    x, y = (local(t, rank, SPLIT) for t in make_batch("mlp"))
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    options = {} if group is None else {"process_group": group}
    generator = torch.Generator().manual_seed(100 + (rank or 0))  # each rank its own labels
    kfac = cg.curvature(
        loss, out, method="kfac", mc_samples=MC_SAMPLES, generator=generator, **options
    )
    kflr = cg.curvature(loss, out, method="kflr", **options)
    results = {}
    for name in ("0.weight", "2.weight"):  # Kronecker blocks G (x) A
        for label, curv in (("kfac", kfac), ("kflr", kflr)):
            results[(label, name, "G")] = curv[name].first
            results[(label, name, "A")] = curv[name].second
    return results


def newton_steps(group, rank):
    """One CGNewton step per method; uneven split with all_reduce_gradients."""
    results = {}
    for method in ("exact", "hbp", "kflr"):
        model = make_model("mlp")
        x, y = (local(t, rank, SPLIT) for t in make_batch("mlp"))
        cg = curvgraph.trace(model)
        out = cg(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        options = {}
        if group is not None:
            all_reduce_gradients(model.parameters(), x.shape[0], group)
            options = {"process_group": group}
        curv = cg.curvature(loss, out, curvature="ggn", method=method, **options)
        opt = curvgraph.optim.CGNewton(
            model.parameters(), lr=1.0, alpha=0.1, cg_tol=1e-6, cg_maxiter=50
        )
        opt.step(curv)
        results[("step", method)] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return results


def ddp_step(group, rank):
    """The docs' recipe: DDP over the traced graph, equal batches, exact GGN step."""
    model = make_model("mlp")
    x, y = (local(t, rank, EVEN_SPLIT) for t in make_batch("mlp"))
    cg = curvgraph.trace(model)
    runner = cg if group is None else nn.parallel.DistributedDataParallel(cg)
    out = runner(x)
    loss = F.cross_entropy(out, y)
    loss.backward()  # DDP averages the gradients over the ranks
    options = {} if group is None else {"process_group": group}
    curv = cg.curvature(loss, out, method="exact", **options)
    dense = curv.to_dense()
    opt = curvgraph.optim.CGNewton(model.parameters(), lr=1.0, alpha=0.1, cg_tol=1e-6)
    opt.step(curv)
    return {
        ("ddp", "curvature"): dense,
        ("ddp", "step"): torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
    }


def thin_roots(group, rank):
    """kfac's output factor of a wide head: a root of N_r rows per rank, 40 outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 40)).to(DTYPE)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 40, (8,), generator=g)
    cg = curvgraph.trace(model)
    out = cg(local(x, rank, SPLIT))
    loss = F.cross_entropy(out, local(y, rank, SPLIT))

    def head(**options):
        generator = torch.Generator().manual_seed(7 + rank)  # the same labels both calls
        curv = cg.curvature(loss, out, method="kfac", mc_samples=1, generator=generator, **options)
        return curv["2.weight"]  # G (x) A

    alone, combined = head(), head(process_group=group)
    return {
        ("kfac", "thin", "local G"): alone.first_factor.to_dense(),
        ("kfac", "thin", "local A"): alone.second_factor.to_dense(),
        ("kfac", "thin", "G"): combined.first_factor.to_dense(),
        ("kfac", "thin", "A"): combined.second_factor.to_dense(),
        ("kfac", "thin", "G kind"): type(combined.first_factor).__name__,
        ("kfac", "thin", "G rows"): combined.first_factor.data.shape[0],
    }


def contradicting_reduction(group):
    """The message when a mean cross-entropy is declared a sum (must raise on every rank)."""
    cg = curvgraph.trace(make_model("mlp"))
    x, y = make_batch("mlp")
    out = cg(x)
    try:
        cg.curvature(F.cross_entropy(out, y), out, process_group=group, loss_reduction="sum")
    except ValueError as error:
        return str(error)
    return ""


def _worker(rank, world_size, port, directory):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=TIMEOUT,
    )
    try:
        group = dist.group.WORLD
        results = compute(group, rank)
        results.update(ddp_step(group, rank))
        results.update(thin_roots(group, rank))
        results["contradicting reduction"] = contradicting_reduction(group)
        torch.save(results, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # spawn, never fork: autograd may already have run in this process (earlier tests or
    # `single`), and a forked child inherits its threads in a state it cannot use
    directory = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.start_processes(
        _worker, args=(2, free_port(), str(directory)), nprocs=2, start_method="spawn"
    )
    return [torch.load(directory / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single():
    results = compute()
    results.update(ddp_step(None, None))
    return results


def test_every_method_equals_one_process_on_the_whole_batch(ranks, single):
    keys = [k for k in single if k[0] in CASES]
    exact = sum(m == "exact" for c in CONFIGS.values() for m, _, _ in c)
    assert len(keys) == sum(len(c) + 1 for c in CONFIGS.values()) + 2 * exact
    for key in keys:
        expected = single[key]
        for rank, results in enumerate(ranks):
            actual = results[key]
            assert actual.shape == expected.shape, key
            error = (actual - expected).abs().max() / expected.abs().max()
            assert error < 1e-12, (key, rank, float(error))


def test_ranks_agree_exactly(ranks):
    for key, value in ranks[0].items():
        if (
            isinstance(value, torch.Tensor) and key[0] != "kfac"
        ):  # kfac: Monte-Carlo: each rank its own labels, combined factors agree
            torch.testing.assert_close(ranks[1][key], value, rtol=0, atol=0)


def test_kfac_factors_equal_kflr_in_distribution(ranks, single):
    for name in ("0.weight", "2.weight"):
        for results in ranks:
            # A: batch average of the inputs, no sampling: equal to KFLR's on all samples
            torch.testing.assert_close(results[("kfac", name, "A")], single[("kflr", name, "A")])
            expected = single[("kflr", name, "G")]
            error = (results[("kfac", name, "G")] - expected).norm() / expected.norm()
            assert error < 0.1, (name, float(error))


def test_newton_step_equals_one_process(ranks, single):
    for method in ("exact", "hbp", "kflr"):
        before = torch.cat([p.detach().reshape(-1) for p in make_model("mlp").parameters()])
        expected = single[("step", method)]
        step = (expected - before).norm()
        assert step > 1e-3  # the step moved the parameters
        for results in ranks:
            # CG amplifies rounding-level differences of blocks and gradients (measured
            # ~1e-12); a wrongly weighted rank would be off by ~1e-1
            error = (results[("step", method)] - expected).norm() / step
            assert error < 1e-10, (method, float(error))


def test_ddp_recipe_with_equal_batches(ranks, single):
    for results in ranks:
        for key in (("ddp", "curvature"), ("ddp", "step")):
            torch.testing.assert_close(results[key], single[key], rtol=1e-10, atol=1e-12)


def test_process_group_without_initialisation_is_refused():
    model = make_model("mlp")
    cg = curvgraph.trace(model)
    x, y = make_batch("mlp")
    out = cg(x)
    loss = F.cross_entropy(out, y)
    with pytest.raises(curvgraph.CurvGraphError, match="init_process_group"):
        cg.curvature(loss, out, process_group=object())
    loss.backward()
    with pytest.raises(ValueError, match="needs a process group"):
        all_reduce_gradients(model.parameters(), 8, None)


def test_loss_reduction_is_checked_and_validated(ranks):
    for results in ranks:
        assert "reduction='mean' but loss_reduction='sum'" in results["contradicting reduction"]
    cg = curvgraph.trace(make_model("mlp"))
    x, y = make_batch("mlp")
    out = cg(x)
    with pytest.raises(ValueError, match="loss_reduction='median'"):
        cg.curvature(F.cross_entropy(out, y), out, loss_reduction="median")


def test_thin_kronecker_roots_stay_roots_over_ranks(ranks):
    """A root's rows are gathered (no dense V x V sum): G = sum_r (N_r / N) G_r, A alike."""
    weights = [n / sum(SPLIT) for n in SPLIT]  # mean loss, mean over inputs: each rank's share
    for factor in ("G", "A"):
        expected = sum(w * r[("kfac", "thin", f"local {factor}")] for w, r in zip(weights, ranks))
        for results in ranks:
            torch.testing.assert_close(results[("kfac", "thin", factor)], expected)
    for results in ranks:
        assert results[("kfac", "thin", "G kind")] == "RootFactor"
        assert results[("kfac", "thin", "G rows")] == sum(SPLIT)  # one MC column per sample
