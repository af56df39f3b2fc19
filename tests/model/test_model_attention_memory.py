"""Activation memory of the attention layers: the steps recomputed in the backward
(latent query, window KV, compressor pooling, output projection, indexer queries) and the query norm's
output-based backward leave values, gradients and the indexer's aux logs unchanged, and a nano CSA
layer's training forward keeps well under half of the 2.5k floats per token it saved before."""

import pytest
import torch

from v4train.model import attention as attention_module
from v4train.model import compressor as compressor_module
from v4train.model.attention import Attention
from v4train.model.config import ModelConfig
from v4train.model.layout import SequenceContext
from v4train.model.rope import apply_rope, rope_angles, rope_frequencies
from support.attention_reference import CSA, HCA, docs_positions, finish_output, random_input, reference_layer
from support.model import make_attention, run


def _value_and_grads(attn, x, forward):
    """``(y, {"x": dx, parameter name: grad})`` of ``forward(x)`` against a fixed random output gradient."""
    attn.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = forward(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in attn.named_parameters() if p.grad is not None}}


def _assert_same(got, want):
    (y, grads), (y_ref, grads_ref) = got, want
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layer", [0, CSA, HCA])
def test_layer_gradients_equal_autograd_through_the_brute_force_reference(layer):
    """Dense mode, packed documents: every gradient equals plain autograd through the [T, T + N] reference."""
    attn = make_attention(layer).train()
    x, pos = random_input(2, 37), torch.stack([docs_positions([11, 26], 1)[0], docs_positions([37], 1)[0]])
    got = _value_and_grads(attn, x, lambda x: run(attn, x, pos, "dense"))
    want = _value_and_grads(attn, x, lambda x: finish_output(attn, reference_layer(attn, x, pos, "dense")[2], pos))
    _assert_same(got, want)


def _saving_everything(monkeypatch):
    """Run every recomputed step as plain autograd (activations saved) and the query norm through autograd."""
    def direct(fn, *args, **kwargs):
        return fn(*args)

    def head_norm_rope(x, cos, sin, eps):
        return apply_rope(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps), cos, sin)

    monkeypatch.setattr(attention_module, "checkpoint", direct)
    monkeypatch.setattr(compressor_module, "checkpoint", direct)
    monkeypatch.setattr(attention_module._HeadNormRope, "apply", head_norm_rope)


@pytest.mark.parametrize("mode", ["indexer_warmup", "sparse"])
def test_recomputation_leaves_values_gradients_and_aux_logs_unchanged(mode, monkeypatch):
    """The CSA layer training its indexer: the KL loss's gradients (indexer parameters) included."""
    attn = make_attention(CSA, index_topk=3).train()
    x, pos = random_input(2, 37), torch.stack([docs_positions([11, 26], 1)[0], docs_positions([37], 1)[0]])
    got = _value_and_grads(attn, x, lambda x: attn(x, SequenceContext(pos, pos, attention_mode=mode)))
    logged = {key: torch.stack(values) for key, values in attn.aux_log.items() if values}
    # logged once per forward, never again by a recomputation
    want_logs = {"indexer_loss": 1, "indexer_recall": 1} if mode == "indexer_warmup" else {"indexer_loss": 1}
    assert {key: len(v) for key, v in logged.items()} == want_logs
    assert any(name.startswith("indexer.") for name in got[1])
    for values in attn.aux_log.values():
        values.clear()
    with monkeypatch.context() as patched:
        _saving_everything(patched)
        want = _value_and_grads(attn, x, lambda x: attn(x, SequenceContext(pos, pos, attention_mode=mode)))
    _assert_same(got, want)
    for key, value in logged.items():
        torch.testing.assert_close(value, torch.stack(attn.aux_log[key]))


def test_query_norm_backward_from_its_output_is_the_exact_gradient():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cos, sin = (a.double() for a in rope_angles(torch.arange(5).repeat(2, 1) * 7, rope_frequencies(8, 10000.0)))
    assert torch.autograd.gradcheck(lambda x: attention_module._HeadNormRope.apply(x, cos, sin, 1e-6), (x,))


def test_nano_csa_layer_saves_under_a_thousand_floats_per_token():
    """Tensors autograd keeps for the backward after a sparse-mode training forward (indexer KL included),
    parameters and the layer input excluded, in fp32 elements per token (2.5k before recomputation)."""
    cfg = ModelConfig.preset("nano")
    attn = Attention(cfg, 1).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * cfg.init_std)
    T = 1024
    x = torch.randn(1, T, cfg.dim, generator=gen, requires_grad=True)
    pos = torch.arange(T).unsqueeze(0)
    skip = {t.untyped_storage().data_ptr() for t in (x, *attn.parameters())}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attn(x, SequenceContext(pos, pos, attention_mode="sparse"))
    assert sum(saved.values()) / 4 / T < 1000


@pytest.mark.parametrize("layer, mode", [(HCA, "dense"), (HCA, "sparse"), (CSA, "dense"), (CSA, "sparse")])
def test_no_layer_builds_the_dense_index_list_it_does_not_read(layer, mode):
    """The [T, T/m] list of every visible slot is cached by the layout for the whole step; only a CSA layer
    training its indexer outside sparse mode reads it (an HCA layer at 32k would keep T^2/32 int32)."""
    attn = make_attention(layer).train()
    x, pos = random_input(1, 64), docs_positions([64], 1)
    ctx = SequenceContext(pos, torch.zeros_like(pos), attention_mode=mode)
    attn(x, ctx).sum().backward()
    assert ctx.layout(attn.ratio)._dense is None
    warmup = SequenceContext(pos, torch.zeros_like(pos), attention_mode="indexer_warmup")
    attn(x, warmup)
    assert (warmup.layout(attn.ratio)._dense is not None) == (layer == CSA)
