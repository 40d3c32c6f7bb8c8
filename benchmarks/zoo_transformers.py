"""Transformer zoo: which Hugging Face architectures curvgraph captures, and are they exact?

``python -m benchmarks.zoo --family transformers`` (the torchvision zoo's format, see
:mod:`benchmarks.zoo`). Every architecture of :data:`ARCHITECTURES` is built from a small
random-init config (2 layers, width 32, vocabulary 100, no weights downloaded) in float64
and eval mode, with the nanoGPT model of :mod:`benchmarks.problem_models` beside them, and
run on a batch of 2 sequences of T = 8 tokens (ViT: 2 images of 16 x 16 pixels, patches of
4). Text inputs have an attention mask with the second sequence padded (its last
:data:`PADS` tokens); the causal language models' labels are -100 at the pads. Columns:

- **route**: the capture route ``curvgraph.trace(..., capture="auto")`` took
  (``cg.route``: ``fx`` or ``export``);
- **hand-written**: the trace without ``fallback`` succeeds (every op has a hand-written
  rule; otherwise the ops without one are listed); **fallback**: with ``fallback=True``;
- **exact**: GGN block products of ``method="exact"`` against ``J^T H J v`` from
  ``torch.func`` alone (``jvp`` / ``vjp`` over ``functional_call`` of the model, under the
  math kernel of scaled dot-product attention; ``H`` the Hessian of the loss w.r.t. the
  outputs), for three random nonzero blocks chosen with a fixed seed; passed if the largest
  relative error (max-norm) is below 1e-8, or below 1e-6 for the models that compute in
  float32 by design (:data:`TOLERANCE_FLOAT32`: Llama-family RMSNorm, T5's LayerNorm cast
  their activations to float32, so a float64 reference agrees to ~1e-7 only). Loss:
  cross-entropy, mean over the counted tokens (``ignore_index=-100``) or over the samples;
- **kfac expand / reduce**: Kronecker blocks of two ``nn.Linear`` layers (the first and
  the last whose weight is not tied) against curvlinops' ``KFACLinearOperator`` with the
  same ``kfac_approx`` (block products with three random vectors, largest relative
  error below the exact check's tolerance). One loss term per sample (logits
  ``[N, C]``): ``method="kflr"`` against ``fisher_type="type-2"``, cross-entropy.
  Per-token outputs ``[N, T, V]``: ``method="kfac"`` with one Monte-Carlo sample of an MSE
  loss on the logits against ``fisher_type="mc"`` drawing the same samples, because
  curvlinops' type-2 factors backpropagate column ``c`` of every token's loss-Hessian root
  together: behind a layer that mixes positions (attention) its ``G`` holds cross-token
  terms that are not in the GGN, for expand as well as reduce (the type-2 expand errors are
  kept in the row as ``kfac_type2_expand``; ``tests/test_kfac_weight_sharing.py`` shows
  the reduce case). curvlinops knows no ``ignore_index``: there every token counts.

:func:`transformer_row` makes one row, :func:`markdown` the table, :func:`main` the command
line (``--models gpt2,llama``, ``--no-exact``, ``--no-kfac``, ``--out``); the results go to
``benchmarks/results/zoo-transformers.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

import curvgraph
from benchmarks.problem_models import nanogpt

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "TOLERANCE",
    "TOLERANCE_FLOAT32",
    "exact_check",
    "kfac_check",
    "main",
    "markdown",
    "transformer_row",
]

DTYPE = torch.float64
BATCH, T, VOCAB, WIDTH, LABELS = 2, 8, 100, 32, 5
PADS = 3  # padded tokens at the end of the second sequence
TOLERANCE = 1e-8
#: models whose forward casts activations to float32 on purpose (RMSNorm's
#: ``hidden_states.to(torch.float32)``, T5's float32 variance): curvgraph and the float64
#: reference each round there, and agree to ~1e-7 relative only
TOLERANCE_FLOAT32 = 1e-6
#: ``|J v| <= ROUNDOFF |outputs| |v|`` (max-norms): the block is zero in exact arithmetic
ROUNDOFF = 1e-13
CURVLINOPS_SEED = 2147483647  # curvlinops' default seed of its Monte-Carlo samples


@dataclass(frozen=True)
class Architecture:
    """One row of the zoo: how to build the model and its example batch.

    Attributes:
        name: the row's label.
        build: returns the model (random init, any dtype; made float64 and eval here).
        task: ``"causal-lm"`` (logits ``[N, T, V]``, labels -100 at pads), ``"seq2seq"``
            (T5: ``input_ids``, ``decoder_input_ids``; logits ``[N, T, V]``),
            ``"classification"`` (text, logits ``[N, C]``), ``"image"`` (``pixel_values``,
            logits ``[N, C]``) or ``"plain-lm"`` (nanoGPT: ``model(idx)``, no mask).
        float32: why the forward computes in float32 by design (tolerance
            :data:`TOLERANCE_FLOAT32`), empty if it does not.
        config: the config's non-default sizes, for the table's notes.
    """

    name: str
    build: Callable[[], nn.Module]
    task: str
    float32: str = ""
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def tolerance(self) -> float:
        """Largest relative error accepted (:data:`TOLERANCE_FLOAT32` if ``float32``)."""
        return TOLERANCE_FLOAT32 if self.float32 else TOLERANCE

    @property
    def output(self) -> Optional[str]:
        """The output selector of ``curvgraph.trace`` (``"logits"``; nanoGPT: ``None``)."""
        return None if self.task == "plain-lm" else "logits"

    @property
    def per_token(self) -> bool:
        """Whether the logits are per token, ``[N, T, V]``."""
        return self.task in ("causal-lm", "seq2seq", "plain-lm")


def _hf(class_name: str, config_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, class_name)(cfg)

    build.__qualname__ = f"build_{class_name}"
    return build


_TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
_DECODER = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH)
_DECODER.update(num_hidden_layers=2, max_position_embeddings=64, **_TOKENS)
_RMS = "RMSNorm casts to float32 (hidden_states.to(torch.float32))"
_ENCODER = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2)
_ENCODER.update(intermediate_size=2 * WIDTH, max_position_embeddings=64, num_labels=LABELS)


def _architectures() -> List[Architecture]:
    gpt2 = dict(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=64, **_TOKENS)
    llama = dict(_DECODER, num_attention_heads=4, num_key_value_heads=2)  # GQA
    roberta = dict(_ENCODER, pad_token_id=1, max_position_embeddings=64 + 2)
    distil = dict(vocab_size=VOCAB, dim=WIDTH, n_layers=2, n_heads=2, hidden_dim=2 * WIDTH)
    distil.update(max_position_embeddings=64, num_labels=LABELS, pad_token_id=0)
    opt = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, ffn_dim=2 * WIDTH)
    opt.update(num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=WIDTH)
    opt.update(bos_token_id=0, eos_token_id=0, pad_token_id=1)
    neox = dict(_DECODER, num_attention_heads=2)
    t5 = dict(vocab_size=VOCAB, d_model=WIDTH, d_kv=16, d_ff=2 * WIDTH, num_layers=2)
    t5.update(num_decoder_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    t5.update(eos_token_id=1, relative_attention_num_buckets=8)
    vit = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_labels=LABELS)
    vit.update(num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * WIDTH)
    nano = dict(vocab_size=128, block_size=64, n_layer=2, n_head=2, n_embd=WIDTH)
    return [
        Architecture("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", **gpt2), "causal-lm", "", gpt2),
        Architecture(
            "bert",
            _hf("BertForSequenceClassification", "BertConfig", **_ENCODER),
            "classification",
            "",
            _ENCODER,
        ),
        Architecture(
            "roberta",
            _hf("RobertaForSequenceClassification", "RobertaConfig", **roberta),
            "classification",
            "",
            roberta,
        ),
        Architecture(
            "distilbert",
            _hf("DistilBertForSequenceClassification", "DistilBertConfig", **distil),
            "classification",
            "",
            distil,
        ),
        Architecture(
            "llama", _hf("LlamaForCausalLM", "LlamaConfig", **llama), "causal-lm", _RMS, llama
        ),
        Architecture(
            "mistral",
            _hf("MistralForCausalLM", "MistralConfig", **llama),
            "causal-lm",
            _RMS,
            llama,
        ),
        Architecture(
            "qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **llama), "causal-lm", _RMS, llama
        ),
        Architecture("opt", _hf("OPTForCausalLM", "OPTConfig", **opt), "causal-lm", "", opt),
        Architecture(
            "gpt_neox", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **neox), "causal-lm", "", neox
        ),
        Architecture(
            "t5",
            _hf("T5ForConditionalGeneration", "T5Config", **t5),
            "seq2seq",
            "T5LayerNorm computes the variance in float32",
            t5,
        ),
        Architecture("vit", _hf("ViTForImageClassification", "ViTConfig", **vit), "image", "", vit),
        Architecture("nanogpt", lambda: nanogpt(**nano), "plain-lm", "", nano),
    ]


def _extras() -> List[Architecture]:
    """Architectures beyond the issue's list (the table's second part)."""
    gemma = dict(_DECODER, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    phi = dict(_DECODER, num_attention_heads=2, partial_rotary_factor=0.5)
    bloom = dict(vocab_size=VOCAB, hidden_size=WIDTH, n_layer=2, n_head=2, **_TOKENS)
    falcon = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, **_TOKENS)
    falcon.update(num_attention_heads=2)
    gptj = dict(vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=64)
    gptj.update(rotary_dim=8, **_TOKENS)
    bart = dict(vocab_size=VOCAB, d_model=WIDTH, encoder_layers=2, decoder_layers=2)
    bart.update(encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * WIDTH)
    bart.update(decoder_ffn_dim=2 * WIDTH, max_position_embeddings=64, pad_token_id=1)
    bart.update(bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    electra = dict(_ENCODER, embedding_size=WIDTH)
    albert = dict(_ENCODER, embedding_size=16)
    swin = dict(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1])
    swin.update(num_heads=[2, 2], window_size=2, num_labels=LABELS)
    gemma_norm = "GemmaRMSNorm computes in float32 (self._norm(x.float()))"
    return [
        Architecture(
            "gemma", _hf("GemmaForCausalLM", "GemmaConfig", **gemma), "causal-lm", gemma_norm, gemma
        ),
        Architecture(
            "qwen3", _hf("Qwen3ForCausalLM", "Qwen3Config", **gemma), "causal-lm", _RMS, gemma
        ),
        Architecture("phi", _hf("PhiForCausalLM", "PhiConfig", **phi), "causal-lm", "", phi),
        Architecture(
            "bloom",
            _hf("BloomForCausalLM", "BloomConfig", **bloom),
            "causal-lm",
            "BloomAttention's softmax computes in float32",
            bloom,
        ),
        Architecture(
            "falcon", _hf("FalconForCausalLM", "FalconConfig", **falcon), "causal-lm", "", falcon
        ),
        Architecture("gptj", _hf("GPTJForCausalLM", "GPTJConfig", **gptj), "causal-lm", "", gptj),
        Architecture(
            "bart", _hf("BartForConditionalGeneration", "BartConfig", **bart), "seq2seq", "", bart
        ),
        Architecture(
            "electra",
            _hf("ElectraForSequenceClassification", "ElectraConfig", **electra),
            "classification",
            "",
            electra,
        ),
        Architecture(
            "albert",
            _hf("AlbertForSequenceClassification", "AlbertConfig", **albert),
            "classification",
            "",
            albert,
        ),
        Architecture(
            "swin", _hf("SwinForImageClassification", "SwinConfig", **swin), "image", "", swin
        ),
    ]


#: the architectures issue 12 asks for (the others are extras)
REQUIRED = tuple(a.name for a in _architectures())


#: every architecture of the table, in its order
ARCHITECTURES: Dict[str, Architecture] = {a.name: a for a in _architectures() + _extras()}


def build(arch: Architecture) -> nn.Module:
    """The float64, eval-mode model of ``arch`` (random init, seed 0).

    Parameters that are exactly zero (zero-initialised biases) get small random values, so
    that no block is trivially simple.
    """
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = arch.build().to(DTYPE).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model


def _pad_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def example(arch: Architecture, model: nn.Module, seed: int = 0) -> Tuple[tuple, dict, Tensor]:
    """``(args, kwargs, labels)`` of the example batch (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    if arch.task == "image":
        pixels = torch.randn(BATCH, 3, 16, 16, generator=generator, dtype=DTYPE)
        return (), {"pixel_values": pixels}, torch.randint(LABELS, (BATCH,), generator=generator)
    vocab = arch.config.get("vocab_size", VOCAB)
    ids = torch.randint(2, vocab, (BATCH, T), generator=generator)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    mask[1, T - PADS :] = 0
    if arch.task == "plain-lm":  # no attention mask: the pads are ignored by the loss only
        labels = torch.randint(vocab, (BATCH, T), generator=generator)
        labels[mask == 0] = -100
        return (ids,), {}, labels
    ids[mask == 0] = _pad_id(model)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if arch.task == "classification":
        return (), kwargs, torch.randint(LABELS, (BATCH,), generator=generator)
    labels = torch.randint(vocab, (BATCH, T), generator=generator)
    if arch.task == "seq2seq":
        kwargs["decoder_input_ids"] = torch.randint(vocab, (BATCH, T), generator=generator)
    else:
        labels[mask == 0] = -100
    return (), kwargs, labels


def loss_of(out: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy, mean over the counted tokens (``[N, T, V]``) or the samples."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))


# -- capture ---------------------------------------------------------------------------------

#: reasons of UnsupportedOpError nodes that the autograd fallback can serve
_FIXABLE = ("no rule", "unsupported", "arguments do not match")


def trace(arch: Architecture, model: nn.Module, fallback: bool) -> curvgraph.CurvGraph:
    """``curvgraph.trace`` of ``model`` on the example batch (``capture="auto"``)."""
    args, kwargs, _ = example(arch, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvgraph.trace(model, *args, fallback=fallback, output=arch.output, **kwargs)


def _trace_status(arch: Architecture, model: nn.Module, fallback: bool):
    """``(graph or None, status)`` as the torchvision zoo records it."""
    try:
        return trace(arch, model, fallback), {"ok": True}
    except curvgraph.UnsupportedOpError as error:
        missing = {op for _, op, _, why in error.nodes if why.startswith(_FIXABLE)}
        problems = {why.split(" (")[0] for _, _, _, why in error.nodes}
        problems = {p for p in problems if not p.startswith(_FIXABLE)}
        return None, {"ok": False, "missing": sorted(missing), "problems": sorted(problems)}
    except Exception as error:  # noqa: BLE001 - recorded in the table
        return None, {"ok": False, "error": _short(error)}


def _short(error: BaseException, length: int = 400) -> str:
    """``Type: message`` on one line, without install paths.

    A capture error of both routes gives the first sentence of each route's report.
    """
    text = str(error)
    routes = [line for line in text.splitlines() if line.startswith("- ")]
    if routes:  # "neither capture route could capture ...:\n- torch.fx ...\n- torch.export ..."
        text = " ".join(line.split(". ")[0] for line in routes)
    text = re.sub(r"\S*/site-packages/", "", " ".join(text.split()))
    text = text.replace(f"{Path(__file__).resolve().parents[1]}/", "")
    return f"{type(error).__name__}: {text[:length]}"


def float32_casts(cg) -> int:
    """Nodes of the captured graph that compute on activations in float32.

    A cast to ``torch.float32`` or an op with ``dtype=torch.float32``; nodes computed
    without parameters (constants: rotary tables, masks) are not counted.
    """
    count = 0
    for node in cg.graph_module.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if node.meta.get("curvgraph_constant"):
            continue
        if torch.float32 in (*node.args, *node.kwargs.values()):
            count += 1
    return count


# -- exact GGN block products ----------------------------------------------------------------


def exact_check(
    arch: Architecture, model: nn.Module, cg, blocks: int = 3, seed: int = 0
) -> Dict[str, Any]:
    """Relative errors of ``method="exact"`` GGN block products against ``torch.func``.

    Blocks are drawn in a random order (``random.Random(seed)``) until ``blocks`` of them
    have a nonzero reference product; a block whose reference is zero (see
    :func:`reference_product`) is listed under ``"zero"``, and its product must be below the
    tolerance times the largest reference product of the checked blocks (else its error is
    ``inf``).

    Returns:
        ``{"errors": {block: relative error}, "zero": [blocks]}``.
    """
    args, kwargs, labels = example(arch, model, seed)
    out = cg(*args, **kwargs)
    largest = F.softmax(out.detach(), dim=-1).max().item()
    if largest > 1 - 1e-6:
        raise RuntimeError(f"the softmax is saturated (probability {largest}): check vacuous")
    curv = cg.curvature(loss_of(out, labels), out, curvature="ggn", method="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    order = sorted(curv)
    random.Random(seed).shuffle(order)
    errors, zero, scales = {}, {}, []
    for name in order:
        if len(errors) == blocks:
            break
        v = torch.randn(params[name].shape, generator=generator, dtype=DTYPE)
        expected = reference_product(arch, model, params, args, kwargs, labels, name, v)
        product = curv[name].matvec(v.flatten()).reshape(v.shape)
        scale = expected.abs().max()
        if scale == 0:
            zero[name] = product.abs().max().item()
            continue
        scales.append(scale.item())
        errors[name] = ((product - expected).abs().max() / scale).item()
    for name, size in zero.items():  # zero blocks: products at round-off of the others
        if size > arch.tolerance * max(scales, default=0.0):
            errors[name] = float("inf")
    del cg, out, curv
    gc.collect()
    return {"errors": errors, "zero": sorted(zero)}


def reference_product(arch, model, params, args, kwargs, labels, name: str, v: Tensor) -> Tensor:
    """``J^T H J v`` of block ``name`` with ``torch.func`` alone (math SDPA kernel).

    Zero where ``J v`` is round-off (:data:`ROUNDOFF`): a parameter the outputs do not
    depend on in exact arithmetic, such as the key bias of softmax attention (it adds one
    constant to all scores of a query).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def outputs(theta: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            result = functional_call(model, {**params, name: theta}, args, kwargs)
        return result if arch.output is None else result[arch.output]

    out, jv = jvp(outputs, (params[name],), (v,))
    if jv.abs().max() <= ROUNDOFF * out.abs().max() * v.abs().max():
        return torch.zeros_like(v)  # the outputs do not change along v: a zero block
    _, hjv = jvp(grad(lambda o: loss_of(o, labels)), (out,), (jv,))
    _, pullback = vjp(outputs, params[name])
    return pullback(hjv)[0]


# -- Kronecker factors against curvlinops ----------------------------------------------------


def kfac_layers(model: nn.Module) -> List[str]:
    """The first and the last ``nn.Linear`` whose weight no other module uses."""
    counts: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    linears = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and counts[id(m.weight)] == 1
    ]
    return linears[:1] + linears[-1:] if len(linears) > 1 else []


class _Logits(nn.Module):
    """``X -> model(**X)[output]``: curvlinops passes dict inputs as one argument.

    ``classes_second``: per-token logits as ``[N, V, T]`` (curvlinops reads cross-entropy
    outputs as ``[N, C, ...]``).
    """

    def __init__(self, arch: Architecture, model: nn.Module, classes_second: bool):
        super().__init__()
        self.arch, self.model, self.classes_second = arch, model, classes_second

    def forward(self, X):  # noqa: D102
        if isinstance(X, Tensor):
            out = self.model(X)
        else:
            out = self.model(**X)
        out = out if self.arch.output is None else out[self.arch.output]
        return out.transpose(1, 2) if self.classes_second and out.dim() == 3 else out


def kfac_check(
    arch: Architecture,
    model: nn.Module,
    cg,
    approx: str,
    seed: int = 0,
    fisher: Optional[str] = None,
) -> Dict:
    """Kronecker blocks of :func:`kfac_layers` against curvlinops (module docstring).

    ``fisher``: ``"type-2"`` (``kflr``, cross-entropy) or ``"mc"`` (``kfac``, one sample of
    an MSE loss, curvlinops' seed); default ``"mc"`` for per-token outputs, else
    ``"type-2"``.

    A block whose reference is at round-off of the other's (:data:`ROUNDOFF`) is zero in
    exact arithmetic, e.g. the reduce block of a key projection: the gradients of all keys
    of a softmax sum to zero, so ``sum_t s_t = 0``. It is listed under ``"zero"`` and passes
    (error 0) if curvgraph's products are below the tolerance times the largest reference.

    Returns:
        ``{"errors": {weight: relative error}, "blocks": {weight: block type},
        "zero": [weights], "mode": the comparison}``.
    """
    from curvlinops import KFACLinearOperator

    layers = kfac_layers(model)
    if not layers:
        others = {
            type(m).__name__
            for m in model.modules()
            if type(m) is not nn.Linear and getattr(m, "weight", None) is not None
        }
        others = sorted(k for k in others if "Linear" in k or "Conv1D" in k)
        alike = f"; linear layers are {', '.join(others)}" if others else ""
        raise LookupError(f"fewer than two nn.Linear layers with an untied weight{alike}")
    args, kwargs, labels = example(arch, model, seed)
    labels = labels.clone()
    labels[labels == -100] = 0  # curvlinops has no ignore_index: every token counts
    mc = (fisher or ("mc" if arch.per_token else "type-2")) == "mc"
    out = cg(*args, **kwargs)
    if mc:
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
        generator = torch.Generator().manual_seed(CURVLINOPS_SEED)
        curv = cg.curvature(
            F.mse_loss(out, target),
            out,
            method="kfac",
            kfac_approx=approx,
            mc_samples=1,
            generator=generator,
        )
        loss_func, fisher, y = nn.MSELoss(), "mc", target
    else:
        curv = cg.curvature(loss_of(out, labels), out, method="kflr", kfac_approx=approx)
        loss_func, fisher, y = nn.CrossEntropyLoss(), "type-2", labels
    weights = [f"{layer}.weight" for layer in layers]
    params = dict(model.named_parameters())
    X = args[0] if args else kwargs
    op = KFACLinearOperator(
        _Logits(arch, model, classes_second=not mc),
        loss_func,
        [params[w] for w in weights],
        [(X, y)],
        fisher_type=fisher,
        kfac_approx=approx,
        check_deterministic=False,
        seed=CURVLINOPS_SEED,
        batch_size_fn=None if args else (lambda X: next(iter(X.values())).shape[0]),
    )
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(op.shape[1], 3, generator=generator, dtype=DTYPE)
    expected = op @ vectors
    errors, blocks, zero, start = {}, {}, [], 0
    largest = expected.abs().max()
    for w in weights:
        size = params[w].numel()
        block = curv[w]
        blocks[w] = type(block).__name__
        rows = slice(start, start + size)
        product = torch.stack([block.matvec(vectors[rows, k]) for k in range(3)], 1)
        start += size
        scale = expected[rows].abs().max()
        if scale <= ROUNDOFF * largest:  # zero in exact arithmetic (see the docstring)
            zero.append(w)
            small = product.abs().max() <= arch.tolerance * largest
            errors[w] = 0.0 if small else float("inf")
            continue
        errors[w] = ((product - expected[rows]).abs().max() / scale).item()
    mode = "kfac, MSE, 1 MC sample vs mc" if mc else "kflr, CE vs type-2"
    return {"errors": errors, "blocks": blocks, "zero": zero, "mode": mode}


# -- rows and table --------------------------------------------------------------------------


def transformer_row(name: str, exact: bool = True, kfac: bool = True, blocks: int = 3) -> Dict:
    """One architecture's row of the table (see the module docstring)."""
    arch = ARCHITECTURES[name]
    start = time.perf_counter()
    model = build(arch)
    row: Dict[str, Any] = {"model": name, "class": type(model).__name__, "task": arch.task}
    row["params"] = sum(p.numel() for p in model.parameters())
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention:
        row["attention"] = attention
    cg, hand = _trace_status(arch, model, fallback=False)
    row["hand_written"] = hand["ok"]
    row["missing"] = hand.get("missing", [])
    if not hand["ok"]:
        cg, status = _trace_status(arch, model, fallback=True)
    else:
        status = hand
    row["fallback"] = status["ok"]
    if "error" in status:
        row["error"] = status["error"]
    if status.get("problems"):
        row["error"] = "; ".join(status["problems"])
    if cg is not None:
        row["route"] = cg.route
        row["float32_casts"] = float32_casts(cg)
    row["tolerance"] = arch.tolerance
    if arch.float32:
        row["float32"] = arch.float32
    if exact and cg is not None:
        try:
            result = exact_check(arch, model, cg, blocks)
            row["exact_errors"] = result["errors"]
            if result["zero"]:
                row["zero_blocks"] = result["zero"]
            row["exact"] = max(result["errors"].values()) < arch.tolerance
        except Exception as error:  # noqa: BLE001 - recorded in the table
            row.update(exact=False, exact_error=_short(error))
    if kfac and cg is not None:
        row["kfac"] = {}
        for approx in ("expand", "reduce"):
            try:
                result = kfac_check(arch, model, cg, approx)
                result["ok"] = max(result["errors"].values()) < arch.tolerance
            except ImportError as error:
                result = {"ok": None, "error": f"n/a (curvlinops missing: {error})"}
            except LookupError as error:
                result = {"ok": None, "error": f"n/a ({error})"}
            except Exception as error:  # noqa: BLE001 - recorded in the table
                result = {"ok": False, "error": _short(error)}
            row["kfac"][approx] = result
        if arch.per_token and row["kfac"]["expand"].get("errors"):  # for the notes
            result = kfac_check(arch, model, cg, "expand", fisher="type-2")
            row["kfac_type2_expand"] = result["errors"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _mark(value: Optional[bool]) -> str:
    return {True: "yes", False: "no", None: "-"}[value]


def _exact_cell(r: Dict) -> str:
    if "exact_errors" in r:
        tol = "" if r["tolerance"] == TOLERANCE else f", tol {r['tolerance']:.0e}"
        return f"{_mark(r['exact'])} ({max(r['exact_errors'].values()):.0e}{tol})"
    if "exact_error" in r:
        return f"failed: {r['exact_error'][:250]}"
    return "-"


def _kfac_cell(r: Dict, approx: str) -> str:
    result = r.get("kfac", {}).get(approx)
    if result is None:
        return "-"
    if "errors" in result:
        kinds = sorted(set(result["blocks"].values()))
        kinds = "" if kinds == ["KroneckerBlock"] else f", {'/'.join(kinds)}"
        zero = f", {len(result['zero'])} zero block" if result.get("zero") else ""
        return f"{_mark(result['ok'])} ({max(result['errors'].values()):.0e}{kinds}{zero})"
    return result["error"][:250] if result["ok"] is None else f"failed: {result['error'][:250]}"


def markdown(rows: Sequence[Dict], commit: str = "") -> str:
    """The table of :func:`transformer_row` results, with its notes."""
    import transformers

    def names(rows):
        return ", ".join(r["model"] for r in rows) or "none"

    hand = [r for r in rows if r["hand_written"]]
    fallback = [r for r in rows if r["fallback"] and not r["hand_written"]]
    untraced = [r for r in rows if not r["fallback"]]
    checked = [r for r in rows if "exact" in r]
    kfac = [r for r in rows if "kfac" in r]
    passed = sum(1 for r in kfac if all(v.get("ok") for v in r["kfac"].values()))
    lines = [
        f"transformers {transformers.__version__}, torch {torch.__version__}"
        + (f", curvgraph commit {commit}" if commit else ""),
        "",
        f"- issue 12's list: {', '.join(REQUIRED)}; the others are extras",
        f"- hand-written rules only ({len(hand)} of {len(rows)}): {names(hand)}",
        f"- with the autograd fallback ({len(fallback)}): {names(fallback)}",
        f"- not traced ({len(untraced)}): {names(untraced)}",
        f"- exact check run on {len(checked)}, passed on {sum(1 for r in checked if r['exact'])}",
        f"- kfac expand and reduce vs curvlinops run on {len(kfac)}, both passed on {passed}",
        "",
        "| model | params | capture route | hand-written rules only | with fallback | exact check "
        "(max rel. error) | kfac expand vs curvlinops | kfac reduce vs curvlinops | ops "
        "without a hand-written rule; other problems |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        missing = ", ".join(f"`{m}`" for m in r.get("missing", []))
        if r.get("error"):
            missing += ("; " if missing else "") + r["error"][:400]
        lines.append(
            f"| {r['model']} ({r['class']}) | {r['params'] / 1e3:.1f}k | {r.get('route', '-')} | "
            f"{_mark(r['hand_written'])} | {_mark(r['fallback'])} | {_exact_cell(r)} | "
            f"{_kfac_cell(r, 'expand')} | {_kfac_cell(r, 'reduce')} | {missing} |"
        )
    lines += ["", *_notes(rows)]
    return "\n".join(lines)


def _notes(rows: Sequence[Dict]) -> List[str]:
    float32 = [
        f"{r['model']} ({r['float32']}; {r.get('float32_casts', '?')} float32 nodes in the graph)"
        for r in rows
        if r.get("float32")
    ]
    notes = [
        "Notes:",
        "",
        f"- Inputs: batch {BATCH}, T = {T} tokens, float64, eval mode, random init (seed 0, "
        "parameters that are exactly zero set to small random values); the second sequence "
        f"is padded (attention mask 0 on its last {PADS} tokens), the causal LMs' labels are "
        "-100 there (nanoGPT has no mask: the loss ignores the same tokens). ViT: 2 images "
        "16 x 16, patches 4 x 4. Configs: 2 layers, width 32, vocabulary 100 (nanoGPT 128).",
        "- Exact check: three random blocks with a nonzero reference product (seed 0), "
        '`method="exact"` against `torch.func` (`jvp`/`vjp` over `functional_call`, math '
        "SDPA kernel); relative error (max-norm) < 1e-8, or < 1e-6 (documented tolerance) "
        "for models whose forward computes in float32 by design: "
        + ("; ".join(float32) or "none")
        + ".",
        "- kfac: the first and the last `nn.Linear` whose weight is not tied; three random "
        "block products against curvlinops' `KFACLinearOperator`, relative error below the "
        "exact check's tolerance. One loss per sample (`[N, C]` logits): `kflr` vs "
        '`fisher_type="type-2"`, cross-entropy. Per-token logits `[N, T, V]`: `kfac` with one '
        'Monte-Carlo sample of an MSE loss on the logits vs `fisher_type="mc"` on the same '
        "samples, since curvlinops' type-2 factors backpropagate column c of every token's "
        "loss-Hessian root together, which behind attention (a layer mixing positions) puts "
        "cross-token terms into G that the GGN does not have, for expand as well as reduce "
        "(type-2 expand errors below). curvlinops has no `ignore_index`: there every token "
        "counts.",
    ]
    for r in rows:
        result = r.get("kfac", {}).get("expand", {})
        if "blocks" in result:
            layers = ", ".join(f"`{w}`" for w in result["blocks"])
            line = f"- {r['model']}: kfac layers {layers} ({result['mode']})"
            if "kfac_type2_expand" in r:
                errors = ", ".join(f"{e:.0e}" for e in r["kfac_type2_expand"].values())
                line += f"; kflr expand vs curvlinops type-2: relative errors {errors}"
            notes.append(line + ".")
    return notes


def main(argv: Optional[List[str]] = None, commit: str = "") -> List[Dict]:
    """Command line (``python -m benchmarks.zoo --family transformers``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--no-exact", action="store_true", help="no exact check")
    parser.add_argument("--no-kfac", action="store_true", help="no comparison with curvlinops")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--commit", default=commit, help="label (default: git HEAD)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/zoo-transformers.json")
    )
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(ARCHITECTURES)}")
    rows = []
    for name in names:
        row = transformer_row(name, not args.no_exact, not args.no_kfac, args.blocks)
        row["commit"] = args.commit
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": args.commit, "rows": rows}, indent=1))
    table = markdown(rows, args.commit)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return rows
