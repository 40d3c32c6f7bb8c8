"""The models of the benchmark problems (:mod:`benchmarks.problems`), one builder each.

Each builder returns a fresh, untrained model (seeding is the caller's business, see
:meth:`benchmarks.problems.Problem.model`); the architectures are described in
:mod:`benchmarks.problems`:

- :func:`logreg`: ``seed_logreg``;
- :func:`mlp`: ``mnist_mlp`` (``nn.ReLU``) and ``mnist_mlp_sigmoid`` (``nn.Sigmoid``);
- :func:`conv_2c2d`: ``fmnist_2c2d``; :func:`conv_3c3d`: ``cifar10_3c3d``;
- :func:`sigmoid_cnn`: ``sigmoid_cnn``;
- :func:`small_resnet`: ``small_resnet``, built from :class:`ResidualBlock`;
- :func:`nanogpt`: a minimal GPT in plain PyTorch in the style of Karpathy's nanoGPT
  (:class:`NanoGPT`; the transformer zoo, :mod:`benchmarks.zoo_transformers`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CausalSelfAttention",
    "GPTBlock",
    "NanoGPT",
    "ResidualBlock",
    "conv_2c2d",
    "conv_3c3d",
    "logreg",
    "mlp",
    "nanogpt",
    "sigmoid_cnn",
    "small_resnet",
]


class ResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with 3x3 convolutions, padding 1 (shape preserving)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, shaped like ``x``."""
        return x + self.conv2(torch.relu(self.conv1(x)))


def logreg() -> nn.Module:
    """Logistic regression ``nn.Linear(784, 10)`` (the seed model)."""
    return nn.Linear(784, 10)


def mlp(activation: Callable[[], nn.Module]) -> nn.Module:
    """The MLP 784-1000-500-100-10 with ``activation()`` after each hidden layer."""
    return nn.Sequential(
        nn.Linear(784, 1000),
        activation(),
        nn.Linear(1000, 500),
        activation(),
        nn.Linear(500, 100),
        activation(),
        nn.Linear(100, 10),
    )


def conv_2c2d() -> nn.Module:
    """DeepOBS's 2c2d: conv 32, conv 64 (5x5 "same", ReLU, max-pool 2), fc 1024, fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),  # "same": padding=2 for 5x5, stride 1 (BackPACK
        # 1.7.1 does not accept the string)
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def conv_3c3d() -> nn.Module:
    """DeepOBS's 3c3d: conv 64, 96, 128 (ReLU, max-pool 3/2), fc 512, fc 256, fc 10."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def sigmoid_cnn() -> nn.Module:
    """The paper's CNN, scaled down: conv 4, conv 8 (5x5, sigmoid, max-pool 2), fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def small_resnet() -> nn.Module:
    """Conv 4/2 + ReLU, two :class:`ResidualBlock` around a max-pool, ReLU, fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        ResidualBlock(4),
        nn.MaxPool2d(2),
        ResidualBlock(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one Linear for ``q, k, v``, SDPA, an output Linear."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C] -> [B, T, C]``; position ``t`` attends to positions ``<= t``."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd, bias=bias),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, C] -> [B, T, C]``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A minimal GPT (Karpathy's nanoGPT design), written in plain PyTorch.

    Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks
    (:class:`GPTBlock`: causal self-attention through
    ``F.scaled_dot_product_attention(is_causal=True)``, a GELU MLP of width ``4 n_embd``),
    a final LayerNorm and a language-model head tied to the token embedding (one parameter,
    ``wte.weight``). Weights are initialised as in nanoGPT: normal with standard deviation
    0.02, ``0.02 / sqrt(2 n_layer)`` for the residual projections, zero biases.

    ``forward(idx)`` maps token ids ``[B, T]`` (``T <= block_size``) to logits ``[B, T, V]``.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 32,
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(GPTBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` of token ids ``idx`` ``[B, T]``."""
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(
    vocab_size: int = 128, block_size: int = 64, n_layer: int = 2, n_head: int = 2, n_embd: int = 32
) -> nn.Module:
    """A small :class:`NanoGPT` (no dropout, with biases)."""
    return NanoGPT(vocab_size, block_size, n_layer, n_head, n_embd)
