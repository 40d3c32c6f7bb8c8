"""Exported language models with their batch split over two gloo ranks equal one process.

The ranks' sequences have different numbers of counted tokens (padding, ``ignore_index``):
a mean over counted tokens combines with weights ``M_r / M``, not ``N_r / N``. GPT-2 looks
its position embeddings up with constant indices, a parameter-only computation whose block
combines over the ranks and is pulled back once; ranks with other sequence lengths (other
position embeddings) are refused.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import curvgraph

transformers = pytest.importorskip("transformers")
V = 50
#: a rank left waiting in a collective fails after this (gloo's default: 30 minutes)
TIMEOUT = datetime.timedelta(seconds=120)
#: a linear weight (Kronecker G (x) A) and the embedding (A (x) G, the input factor first)
NAMES = ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight")


def setup():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=V,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, V, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[2, 2:] = 0  # rank 1 holds samples 2 and 3: fewer counted tokens than rank 0
    mask[3, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    vs = {n: torch.randn(sizes[n], dtype=torch.float64) for n in NAMES}
    return model, ids, mask, labels, vs


def products(group=None, rank=None):
    """Exact, kflr and diag products of two blocks, on the whole batch or this rank's half."""
    model, ids, mask, labels, vs = setup()
    if rank is not None:
        part = slice(2 * rank, 2 * rank + 2)
        ids, mask, labels = ids[part], mask[part], labels[part]
    cg = curvgraph.trace(model, input_ids=ids, attention_mask=mask, output="logits")
    results = {}
    for method in ("exact", "kflr", "diag"):
        out = cg(input_ids=ids, attention_mask=mask)
        loss = F.cross_entropy(out.reshape(-1, V), labels.reshape(-1))
        curvature = cg.curvature(loss, out, "ggn", method, process_group=group)
        for name in NAMES:
            results[method, name] = curvature[name].matvec(vs[name])
    return results


def gpt2_products(group=None, rank=None, length=6):
    """GPT-2 (position embeddings: a derived tensor), exact GGN and Hessian products."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, V, (4, 6))
    if rank is not None:
        ids = ids[2 * rank : 2 * rank + 2, :length]
    v = torch.randn(dict(model.named_parameters())["transformer.wpe.weight"].numel())
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    results = {}
    for curvature in ("ggn", "hessian"):
        out = cg(input_ids=ids)
        loss = F.cross_entropy(out.reshape(-1, V), ids.reshape(-1))
        blocks = cg.curvature(loss, out, curvature, "exact", process_group=group)
        results["gpt2", curvature] = blocks["transformer.wpe.weight"].matvec(v.double())
    return results


def _worker(rank, port, directory):
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2, timeout=TIMEOUT)
    try:
        results = products(dist.group.WORLD, rank)
        results.update(gpt2_products(dist.group.WORLD, rank))
        try:  # rank 1 with shorter sequences: other position embeddings
            gpt2_products(dist.group.WORLD, rank, length=6 - rank)
            results["other lengths"] = ""
        except curvgraph.CurvGraphError as error:
            results["other lengths"] = str(error)
        torch.save(results, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batches_split_over_ranks_equal_one_process(tmp_path):
    single = {**products(), **gpt2_products()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn: autograd already ran in this process (fork would inherit its threads)
    torch.multiprocessing.start_processes(
        _worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Llama's RMSNorm computes in float32 by design, and float32 reductions round by the
    # batch's shape: 1e-6 (weights N_r / N instead of M_r / M would be 30% off here).
    # kflr (expand): G sums over the ranks' losses, A averages their positions, whichever
    # side of the Kronecker product each is on: the one-process factors too
    for key, expected in single.items():
        for result in ranks:
            error = (result[key] - expected).norm() / expected.norm()
            assert error < 1e-6, (key, error.item())
    for result in ranks:
        assert "differs between the ranks" in result["other lengths"]
        assert "parameter-only computation" in result["other lengths"]
