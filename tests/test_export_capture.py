"""Capture through torch.export: Hugging Face GPT-2, BERT and Llama (tiny random-init configs).

Every exact GGN block product is compared with torch.func in float64 (``J^T H J v``, the
reference under SDPA's math backend: the CPU flash kernel has no forward-mode derivative),
on padded batches with ignored label positions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvgraph
from curvgraph.errors import SymbolicTraceError, TraceError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 100


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return transformers.BertForSequenceClassification(config)


def llama():
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


#: Llama's RMSNorm computes in float32 on purpose (``hidden_states.to(torch.float32)``): the
#: reference's derivative is rounded there, curvgraph's tangents stay in float64
TOLERANCE = {"gpt2": 1e-10, "bert": 1e-10, "llama": 1e-6}


def batch(seed=0, n=2, t=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[-1, t - 3 :] = 0  # the last sequence is padded
    labels = torch.randint(0, V, (n, t), generator=g).masked_fill(mask == 0, -100)
    return ids, mask, labels


def loss_function(model_name, labels, reduction="mean"):
    if model_name == "bert":
        y = labels[:, 0].clamp(min=0) % 2
        return lambda out: F.cross_entropy(out, y, reduction=reduction)
    return lambda out: F.cross_entropy(
        out.reshape(-1, out.shape[-1]), labels.reshape(-1), reduction=reduction
    )


def ggn_product(model, inputs, loss_of, name, v):
    """``J^T H J v`` for the block ``name`` with torch.func (float64 reference)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def logits(theta):
        return functional_call(model, {**params, name: theta}, (), inputs).logits

    with sdpa_kernel(SDPBackend.MATH):
        out, jv = jvp(logits, (params[name],), (v,))
        _, hjv = jvp(grad(loss_of), (out.detach(),), (jv,))
        _, pull = vjp(logits, params[name])
        return pull(hjv)[0]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("model_name", ["gpt2", "bert", "llama"])
def test_exact_ggn_blocks_match_torch_func(model_name):
    torch.manual_seed(0)
    model = {"gpt2": gpt2, "bert": bert, "llama": llama}[model_name]().double().eval()
    ids, mask, labels = batch()
    inputs = {"input_ids": ids, "attention_mask": mask}
    cg = curvgraph.trace(model, **inputs, output="logits")
    assert cg.route == "export"
    out = cg(**inputs)
    torch.testing.assert_close(out, model(**inputs).logits, rtol=0, atol=1e-12)
    loss_of = loss_function(model_name, labels)
    curvature = cg.curvature(loss_of(out), out, "ggn", "exact")
    assert set(curvature) == {n for n, p in model.named_parameters()}  # names as the model's
    names = list(curvature)
    g = torch.Generator().manual_seed(1)
    chosen = [names[i] for i in torch.randperm(len(names), generator=g)[:3].tolist()]
    for name in chosen + [names[0], names[-1]]:  # the embedding (tied in GPT-2) and the head
        shape = dict(model.named_parameters())[name].shape
        v = torch.randn(shape, dtype=torch.float64, generator=g)
        expected = ggn_product(model, inputs, loss_of, name, v).flatten()
        assert expected.norm() > 0
        error = relative_error(curvature[name].matvec(v.flatten()), expected)
        assert error < TOLERANCE[model_name], (name, error)


def test_padded_batch_equals_the_same_tokens_without_padding():
    """Sum over counted tokens: padded batch = the sequences one by one at their own length."""
    torch.manual_seed(0)
    model = gpt2().double().eval()
    ids, mask, labels = batch()
    cg = curvgraph.trace(model, input_ids=ids, attention_mask=mask, output="logits")
    out = cg(input_ids=ids, attention_mask=mask)
    padded = cg.curvature(loss_function("gpt2", labels, "sum")(out), out, "ggn", "exact")
    name = "transformer.h.0.attn.c_attn.weight"
    v = torch.randn(dict(model.named_parameters())[name].shape, dtype=torch.float64)
    total = torch.zeros(v.numel(), dtype=torch.float64)
    for n, length in ((0, 8), (1, 5)):  # the second sequence has 5 real tokens
        one = {"input_ids": ids[n : n + 1, :length], "attention_mask": mask[n : n + 1, :length]}
        out = cg(**one)  # another sequence length: captured again
        loss = loss_function("gpt2", labels[n : n + 1, :length], "sum")(out)
        total += cg.curvature(loss, out, "ggn", "exact")[name].matvec(v.flatten())
    assert relative_error(padded[name].matvec(v.flatten()), total) < 1e-10


def test_calls_with_other_shapes_keywords_or_mode_are_captured_again():
    torch.manual_seed(0)
    model = gpt2().eval()
    ids, mask, _ = batch()
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    graph = cg.graph_module
    longer = torch.randint(0, V, (3, 12))
    torch.testing.assert_close(cg(input_ids=longer), model(input_ids=longer).logits)
    assert cg.graph_module is not graph
    graph = cg.graph_module
    cg(input_ids=longer[:1])  # another batch size: the same graph (the batch axis is dynamic)
    assert cg.graph_module is graph
    with_mask = cg(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(with_mask, model(input_ids=ids, attention_mask=mask).logits)
    model.train()  # dropout on: an exported graph fixes the mode, so it is captured again
    graph = cg.graph_module
    out = cg(input_ids=ids, attention_mask=mask)
    assert cg.graph_module is not graph
    assert not torch.allclose(out, with_mask)  # dropout acts (its random stream is its own)
    model.eval()
    torch.testing.assert_close(cg(input_ids=ids, attention_mask=mask), with_mask)


def test_output_selector_and_model_outputs():
    torch.manual_seed(0)
    model = gpt2().double().eval()
    ids, _, labels = batch()
    by_callable = curvgraph.trace(model, ids, output=lambda result: result.logits)
    out = by_callable(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, V)
    with pytest.raises(TraceError, match="output='logits'"):  # the output holds a cache
        curvgraph.trace(model, ids)
    model.config.use_cache = False
    whole = curvgraph.trace(model, ids)  # the whole ModelOutput: a dict of tensors
    result = whole(ids)
    assert isinstance(result, dict) and set(result) == {"logits"}
    with pytest.raises(curvgraph.CurvGraphError, match="single tensor|dict"):
        logits = result["logits"]
        whole.curvature(loss_function("gpt2", labels)(logits), logits)
    with pytest.raises(TraceError, match="selects nothing"):
        curvgraph.trace(model, ids, output="hidden")


def test_routes_and_their_errors():
    model = gpt2().eval()
    ids, _, _ = batch()
    with pytest.raises(SymbolicTraceError, match="torch.fx could not trace"):
        curvgraph.trace(model, ids, capture="fx")
    with pytest.raises(SymbolicTraceError, match=r"curvgraph.trace\(model, x\)"):
        curvgraph.trace(model)  # no example inputs: nothing to export with
    with pytest.raises(ValueError, match="capture='jit'"):
        curvgraph.trace(model, ids, capture="jit")
    small = nn.Sequential(nn.Linear(4, 3), nn.Tanh())  # symbolic tracing works: fx
    assert curvgraph.trace(small).route == "fx"
    exported = curvgraph.trace(small, torch.randn(5, 4), capture="export")
    assert exported.route == "export"
    x = torch.randn(7, 4)
    torch.testing.assert_close(exported(x), small(x))


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class WithFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(StraightThrough.apply(x) + x)


def test_export_refuses_custom_autograd_functions():
    with pytest.raises(TraceError, match="StraightThrough.*drop its backward"):
        curvgraph.trace(WithFunction(), torch.randn(3, 4), capture="export")


def test_copies_of_an_exported_graph_capture_again():
    torch.manual_seed(0)
    model = gpt2().double().eval()
    ids, _, _ = batch()
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    twin = copy.deepcopy(cg)
    assert twin.route == "export" and twin.model is not model
    torch.testing.assert_close(twin(input_ids=ids), cg(input_ids=ids))


def test_token_ids_out_of_range_name_the_node():
    model = gpt2().eval()
    ids, _, _ = batch()
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    with pytest.raises(IndexError, match=r"index out of range[\s\S]*self.wte\(input_ids\)"):
        cg(input_ids=ids + V)


class XW(nn.Module):
    """``x @ W`` with ``W`` ``[d, m]`` (Hugging Face's Conv1D without the fold)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return torch.tanh(x) @ self.weight


@pytest.mark.parametrize("method", ["kflr", "kfac"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kronecker_factors_of_x_at_w_are_those_of_the_transposed_linear(method, approx):
    torch.manual_seed(0)
    weight = torch.randn(5, 3, dtype=torch.float64)
    linear = nn.Sequential(nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    linear[1].weight.data = weight.T.clone()
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    blocks = []
    for model in (XW(weight.clone()), linear):
        cg = curvgraph.trace(model)
        out = cg(x)
        torch.manual_seed(1)  # the same Monte-Carlo samples for kfac
        c = cg.curvature(F.mse_loss(out, y), out, "ggn", method, kfac_approx=approx)
        (block,) = c.values()
        assert isinstance(block, curvgraph.KroneckerBlock)
        blocks.append(block)
    ours, reference = blocks
    torch.testing.assert_close(ours.first, reference.second)
    torch.testing.assert_close(ours.second, reference.first)


class MaskedAttention(nn.Module):
    """SDPA with a boolean mask whose second query may attend to no key."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(4, 4) for _ in range(3))
        self.o = nn.Linear(4, 3)
        allowed = [[True, False, False], [False, False, False], [True, True, True]]
        self.register_buffer("mask", torch.tensor(allowed))

    def forward(self, x):
        q, k, v = (layer(x).unsqueeze(1) for layer in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask).squeeze(1))


def test_a_query_attending_to_no_key_gets_zero_weights_as_in_sdpa():
    """SDPA's safe softmax: zero weights where a plain softmax gives NaN (fx route)."""
    torch.manual_seed(0)
    model = MaskedAttention().double()
    x, y = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    cg = curvgraph.trace(model)
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    curvature = cg.curvature(F.mse_loss(out, y), out, "ggn", "exact")
    for name in ("q.weight", "v.weight"):
        theta = dict(model.named_parameters())[name]
        with sdpa_kernel(SDPBackend.MATH):  # reverse mode only: jvp fails on its safe softmax
            jac = torch.autograd.functional.jacobian(
                lambda t, name=name: functional_call(model, {name: t}, (x,)), theta.detach()
            ).reshape(out.numel(), -1)
        hessian = torch.autograd.functional.hessian(
            lambda o: F.mse_loss(o, y), out.detach()
        ).reshape(out.numel(), -1)
        v = torch.randn(theta.numel(), dtype=torch.float64)
        expected = jac.T @ hessian @ jac @ v
        assert relative_error(curvature[name].matvec(v), expected) < 1e-10


def test_an_all_masked_sequence_adds_nothing():
    torch.manual_seed(0)
    model = gpt2().double().eval()
    ids, mask, labels = batch()
    mask[1], labels[1] = 0, -100  # the second sequence is all padding
    cg = curvgraph.trace(model, input_ids=ids, attention_mask=mask, output="logits")
    out = cg(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask).logits)
    assert not out.isnan().any()
    name = "transformer.h.0.attn.c_attn.weight"
    v = torch.randn(dict(model.named_parameters())[name].numel(), dtype=torch.float64)
    both = cg.curvature(loss_function("gpt2", labels, "sum")(out), out, "ggn", "exact")
    out = cg(input_ids=ids[:1], attention_mask=mask[:1])
    one = cg.curvature(loss_function("gpt2", labels[:1], "sum")(out), out, "ggn", "exact")
    assert relative_error(both[name].matvec(v), one[name].matvec(v)) < 1e-10


def test_a_float_attention_mask_computed_from_parameters_gets_its_blocks():
    """T5's relative position bias reaches SDPA as a float mask: its blocks are not dropped."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=16, d_kv=8, d_ff=32, num_heads=2,
        vocab_size=V, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).double().eval()
    ids, mask, labels = batch(t=6)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}
    cg = curvgraph.trace(model, **inputs, output="logits")
    out = cg(**inputs)
    loss_of = loss_function("t5", labels)
    curvature = cg.curvature(loss_of(out), out, "ggn", "exact")
    g = torch.Generator().manual_seed(0)
    for name in (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ):
        v = torch.randn(
            dict(model.named_parameters())[name].shape, dtype=torch.float64, generator=g
        )
        expected = ggn_product(model, inputs, loss_of, name, v).flatten()
        # T5's LayerNorm computes its variance in float32 by design (as Llama's RMSNorm)
        assert relative_error(curvature[name].matvec(v.flatten()), expected) < 1e-6


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).reshape(4, 3)  # only a batch of exactly 4


def test_a_model_that_fixes_the_batch_size_is_refused_with_what_to_do():
    with pytest.raises(TraceError, match=r"specialized it to be a constant \(4\)[\s\S]*x.shape"):
        curvgraph.trace(FixedBatch(), torch.randn(4, 4), capture="export")
