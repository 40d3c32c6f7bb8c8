"""The transformer zoo's models: small random-init Hugging Face configs and their batches.

:data:`ARCHITECTURES` (the issue's required list, :data:`REQUIRED`, and extras), how each is
built (:func:`build`, float64, eval mode) and its example batch (:func:`example`: 2
sequences of T = 8 tokens, the second padded) for :mod:`benchmarks.zoo_transformers`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.problem_models import nanogpt

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


def example(
    arch: Architecture, model: nn.Module, seed: int = 0, padded: bool = True
) -> Tuple[tuple, dict, Tensor]:
    """``(args, kwargs, labels)`` of the example batch (see the module docstring).

    ``padded=False``: no padding (curvlinops' KFAC averages its input factors over every
    position, curvgraph's over the positions the loss reaches: they agree without padding).
    """
    generator = torch.Generator().manual_seed(seed)
    if arch.task == "image":
        pixels = torch.randn(BATCH, 3, 16, 16, generator=generator, dtype=DTYPE)
        return (), {"pixel_values": pixels}, torch.randint(LABELS, (BATCH,), generator=generator)
    vocab = arch.config.get("vocab_size", VOCAB)
    ids = torch.randint(2, vocab, (BATCH, T), generator=generator)
    mask = torch.ones(BATCH, T, dtype=torch.long)
    if padded:
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
