"""KFAC for weights shared over positions counts the positions the loss reaches (padding).

A padded batch's ``expand`` and ``reduce`` factors equal those of its sequences run one by
one at their own lengths, combined as their definitions say (``A`` averaged over counted
positions or samples, ``G`` summed), for Linear layers, ``x @ W`` and embeddings; and a batch split
over ranks with different padding weights each rank's ``A`` by its counted positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph

V, D = 11, 6


class TinyLM(nn.Module):
    """Embedding, a causal mixing of positions, a Linear MLP and an ``x @ W`` head."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D), nn.Linear(D, D)
        self.head = nn.Parameter(torch.randn(D, V) / D**0.5)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + torch.cumsum(h, dim=1) / 4  # causal: a position sees itself and earlier ones
        return torch.tanh(self.fc(h)) @ self.head


def kronecker(model, ids, labels, method, approx):
    cg = curvgraph.trace(model)
    out = cg(ids)
    loss = F.cross_entropy(out.reshape(-1, V), labels.reshape(-1), reduction="sum")
    curv = cg.curvature(loss, out, "ggn", method, kfac_approx=approx)
    return {n: b for n, b in curv.items() if isinstance(b, curvgraph.KroneckerBlock)}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_a_padded_batch_has_the_factors_of_its_tokens(approx):
    torch.manual_seed(0)
    model = TinyLM().double()
    ids = torch.randint(0, V, (2, 6))
    labels = ids.clone()
    labels[1, 4:] = -100  # the second sequence: 4 tokens and 2 of padding
    padded = kronecker(model, ids, labels, "kflr", approx)
    assert set(padded) == {"emb.weight", "fc.weight", "head"}
    parts = [
        kronecker(model, ids[:1], labels[:1], "kflr", approx),
        kronecker(model, ids[1:, :4], labels[1:, :4], "kflr", approx),
    ]
    counts = [6, 4] if approx == "expand" else [1, 1]  # what A averages over
    for name, block in padded.items():
        a_index = 0 if block.input_first else 1
        g_index = 1 - a_index
        expected_a = sum(
            c * [p[name].first, p[name].second][a_index] for c, p in zip(counts, parts)
        )
        expected_a = expected_a / sum(counts)
        expected_g = sum([p[name].first, p[name].second][g_index] for p in parts)
        factors = [block.first, block.second]
        torch.testing.assert_close(factors[a_index], expected_a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(factors[g_index], expected_g, rtol=1e-10, atol=1e-13)
        assert block.input_count == sum(counts)


def test_without_padding_every_position_counts():
    torch.manual_seed(0)
    model = TinyLM().double()
    ids = torch.randint(0, V, (3, 5))
    blocks = kronecker(model, ids, ids, "kflr", "expand")
    assert all(b.input_count == 15 for b in blocks.values())
