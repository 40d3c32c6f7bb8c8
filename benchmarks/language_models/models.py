"""The section's models and batches: GPT-2 (Hugging Face) and nanoGPT, at named sizes.

A :class:`ModelSpec` names a model family (``"gpt2"``: ``transformers.GPT2LMHeadModel`` from
a random-init ``GPT2Config``; ``"nanogpt"``: :class:`benchmarks.problem_models.NanoGPT`), its
configuration, and the batch (``N`` sequences of ``T`` tokens, float32). :func:`build` makes
the model (``torch.manual_seed(0)``, eval mode: no dropout), token ids and next-token targets
(uniform, seeded) and the functions every candidate shares:

- ``logits(ids)``: the plain model's logits ``[N, T, V]``;
- ``loss(logits)``: ``F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))``, the mean
  over the ``N T`` tokens;
- ``trace()``: ``curvgraph.trace(model, ...)`` (``torch.export`` for GPT-2, ``output="logits"``);
- ``curvlinops_model()``: the model as curvlinops reads a cross-entropy over tokens (logits as
  ``[N, V, T]``, PyTorch's class-second layout), with attention through the math kernel of
  ``scaled_dot_product_attention`` (the CPU flash kernel has no forward-mode derivative,
  which curvlinops' GGN product needs).

nanoGPT is measured as written (``capture="auto"``: symbolic tracing), the same model for
the gradient, curvgraph and curvlinops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODELS", "Built", "ModelSpec", "build", "kronecker_layers"]


@dataclass(frozen=True)
class ModelSpec:
    """A model family, its configuration and the batch size ``N x T``."""

    name: str
    family: str  # "gpt2" | "nanogpt"
    config: Dict[str, Any] = field(default_factory=dict)
    N: int = 4
    T: int = 128
    description: str = ""

    @property
    def vocab(self) -> int:
        """The vocabulary size ``V``."""
        return int(self.config["vocab_size"])

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict (the worker's request)."""
        return {
            "name": self.name,
            "family": self.family,
            "config": dict(self.config),
            "N": self.N,
            "T": self.T,
            "description": self.description,
        }

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> ModelSpec:
        """The spec of :meth:`to_dict`'s dict."""
        return ModelSpec(
            d["name"], d["family"], dict(d["config"]), d["N"], d["T"], d["description"]
        )


#: the section's models by name. ``gpt2-small``: GPT-2 small (``GPT2Config()``: 12 layers,
#: width 768, 12 heads, vocabulary 50257); ``nanogpt-char``: nanoGPT's Shakespeare-character
#: configuration (6 layers, width 384, 6 heads, vocabulary 65, context 256); the tiny ones
#: are the quick suite's and the tests'.
MODELS: Dict[str, ModelSpec] = {
    "gpt2-small": ModelSpec(
        "gpt2-small",
        "gpt2",
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        4,
        128,
        "GPT-2 small (GPT2Config(): 12 layers, width 768, 12 heads, vocab 50257), random init",
    ),
    "gpt2-reduced": ModelSpec(
        "gpt2-reduced",
        "gpt2",
        dict(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64),
        4,
        32,
        "GPT-2, 2 layers, width 64, 2 heads, vocab 128 (for methods that do not fit GPT-2 small)",
    ),
    "gpt2-tiny": ModelSpec(
        "gpt2-tiny",
        "gpt2",
        dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64),
        4,
        32,
        "GPT-2, 2 layers, width 64, 2 heads, vocab 1000",
    ),
    "nanogpt-char": ModelSpec(
        "nanogpt-char",
        "nanogpt",
        dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384),
        4,
        128,
        "nanoGPT, Shakespeare-character config (6 layers, width 384, 6 heads, vocab 65)",
    ),
    "nanogpt-tiny": ModelSpec(
        "nanogpt-tiny",
        "nanogpt",
        dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32),
        4,
        16,
        "nanoGPT, 2 layers, width 32, 2 heads, vocab 64",
    ),
}


class _ClassesSecond(nn.Module):
    """``ids -> logits.transpose(1, 2)`` through the math attention kernel (curvlinops)."""

    def __init__(self, model: nn.Module, logits: Callable[[Tensor], Tensor]):
        super().__init__()
        self.model = model
        self._logits = logits

    def forward(self, ids: Tensor) -> Tensor:  # noqa: D102
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self._logits(ids).transpose(1, 2)


@dataclass
class Built:
    """A built model with its batch and the functions the candidates share."""

    spec: ModelSpec
    model: nn.Module
    ids: Tensor
    targets: Tensor
    logits: Callable[[Tensor], Tensor]
    trace: Callable[[], Any]
    traced_logits: Callable[[Any], Tensor]

    def loss(self, logits: Tensor) -> Tensor:
        """Cross-entropy over the ``N T`` tokens, mean."""
        V = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, V), self.targets.reshape(-1))

    def curvlinops_model(self) -> nn.Module:
        """The model as curvlinops reads it (module docstring)."""
        return _ClassesSecond(self.model, self.logits)

    def parameters(self) -> Dict[str, Tensor]:
        """The model's named parameters."""
        return dict(self.model.named_parameters())


def build(spec: ModelSpec) -> Built:
    """The model of ``spec`` (seed 0, eval mode), its batch and its functions."""
    import curvgraph

    torch.manual_seed(0)
    if spec.family == "gpt2":
        import transformers

        transformers.logging.set_verbosity_error()
        config = transformers.GPT2Config(**spec.config, use_cache=False)
        model = transformers.GPT2LMHeadModel(config).eval()

        def logits(ids: Tensor) -> Tensor:
            return model(input_ids=ids).logits

        def trace():
            return curvgraph.trace(model, input_ids=ids, output="logits")

        def traced_logits(cg) -> Tensor:
            return cg(input_ids=ids)

    elif spec.family == "nanogpt":
        from benchmarks.problem_models import NanoGPT

        model = NanoGPT(**spec.config).eval()

        def logits(ids: Tensor) -> Tensor:
            return model(ids)

        def trace():
            return curvgraph.trace(model, ids)

        def traced_logits(cg) -> Tensor:
            return cg(ids)

    else:
        raise ValueError(f"unknown model family {spec.family!r}")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab, (spec.N, spec.T), generator=generator)
    targets = torch.randint(0, spec.vocab, (spec.N, spec.T), generator=generator)
    return Built(spec, model, ids, targets, logits, trace, traced_logits)


def kronecker_layers(built: Built) -> List[Dict[str, Any]]:
    """Every weight with Kronecker structure: ``nn.Linear`` and Hugging Face ``Conv1D``.

    Per layer: module name, ``d_out``, ``d_in``, ``positions`` (``N T`` for a weight applied
    to every token), whether curvlinops' KFAC covers it (``nn.Linear`` only) and whether its
    weight is tied to another module (GPT-2's and nanoGPT's head share the token embedding).
    """
    counts: Dict[int, int] = {}
    for module in built.model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    layers: List[Dict[str, Any]] = []
    handles = []

    def hook(name: str, module: nn.Module):
        def record(mod, inputs, output):
            x = inputs[0]
            if isinstance(mod, nn.Linear):
                d_out, d_in = mod.weight.shape
            else:  # Conv1D: y = x W + b, W [d_in, d_out]
                d_in, d_out = mod.weight.shape
            layers.append(
                {
                    "module": name,
                    "type": type(mod).__name__,
                    "d_out": int(d_out),
                    "d_in": int(d_in),
                    "positions": int(x.numel() // x.shape[-1]),
                    "curvlinops_kfac": isinstance(mod, nn.Linear),
                    "tied": counts[id(mod.weight)] > 1,
                }
            )

        return record

    for name, module in built.model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        with torch.no_grad():
            built.logits(built.ids)
    finally:
        for handle in handles:
            handle.remove()
    return layers
