"""A tied weight's block over 2 gloo ranks: the sum of its uses' Kronecker blocks, combined.

``kflr`` with ``kfac_approx="expand"`` gives a tied embedding/head weight a ``SumBlock`` of
two Kronecker blocks; over ranks each term combines like an untied Kronecker block (``G`` a
loss sum, ``A`` a batch mean), and the result must equal one process on the whole batch
(float64, 3 + 5 sequences).
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature.sums import SumBlock

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

DTYPE = torch.float64
SPLIT = (3, 5)
V, D, T = 7, 4, 3
TIMEOUT = datetime.timedelta(seconds=60)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(self.emb(x))), self.emb.weight)


def blocks(group=None, rank=None):
    torch.manual_seed(0)
    model = TiedLM().to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(V, (8, T), generator=g), torch.randint(V, (8, T), generator=g)
    if rank is not None:
        start = sum(SPLIT[:rank])
        x, y = x[start : start + SPLIT[rank]], y[start : start + SPLIT[rank]]
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="sum")
    options = {} if group is None else {"process_group": group, "loss_reduction": "sum"}
    curv = cg.curvature(loss, out, method="kflr", kfac_approx="expand", **options)
    assert isinstance(curv["emb.weight"], SumBlock)
    return {name: block.to_dense() for name, block in curv.items()}


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
        torch.save(blocks(dist.group.WORLD, rank), f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_tied_sum_block_over_ranks_equals_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(
        _worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    expected = blocks()
    for rank in range(2):
        actual = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(actual) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-12, atol=1e-13)
