"""Small models with Kronecker weights for the Kronecker-factor and EK-FAC tests (float64).

:func:`problem` gives ``(model, x, y, weights)`` for an MLP, a CNN, a Conv1d/ConvTranspose1d
net, a pooled sequence model and a token model (the ``cl`` fixture: tests/conftest.py).
"""

import torch
from torch import nn

DTYPE = torch.float64
N = 6


class Pooled(nn.Module):
    """Linear on ``[N, T, D]``, tanh, mean over ``T``, linear head: one loss term per sample."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).mean(1))


class TokenModel(nn.Module):
    """Embedding -> Linear -> tanh -> Linear on token ids ``[N, T]``: logits ``[N, T, V]``."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(7, 4), nn.Linear(4, 5), nn.Linear(5, 7)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.emb(x))))


def problem(kind: str):
    """``(model, x, y, weights)``: model, batch, and the names of its Kronecker weights."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x, weights = torch.randn(N, 5), ["0.weight", "2.weight"]
    elif kind == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)
        )
        x, weights = torch.randn(N, 2, 4, 4), ["0.weight", "3.weight"]
    elif kind == "conv1d":  # Conv1d and ConvTranspose1d (its input factor first)
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3),
            nn.Tanh(),
            nn.ConvTranspose1d(3, 2, 2),
            nn.Flatten(),
            nn.Linear(12, 3),
        )
        x, weights = torch.randn(N, 2, 7), ["0.weight", "2.weight", "4.weight"]
    elif kind == "pooled":
        model, x, weights = Pooled(), torch.randn(N, 4, 4), ["fc.weight", "head.weight"]
    else:
        model, x = TokenModel(), torch.randint(7, (N, 3))
        return (
            model.to(DTYPE),
            x,
            torch.randint(7, (N, 3)),
            ["emb.weight", "fc.weight", "head.weight"],
        )
    return model.to(DTYPE), x.to(DTYPE), torch.randint(3, (N,)), weights
