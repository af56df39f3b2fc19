"""The model's training step through the Triton kernels (what CUDA ranks run) equals the torch path.

Under ``TRITON_INTERPRET=1`` the kernels dispatch sends the sparse attention (forward and its autograd
backward) and the indexer top-k to the Triton kernels, as it does for CUDA tensors; the loss and every
parameter's gradient of a whole stage in ``sparse`` mode must match the torch path's.
"""

import pytest
import torch

from support.model import small_cfg
from v4train import kernels
from v4train.model import V4Stage


def _train_pass(cfg, ids, pos):
    torch.manual_seed(0)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(3)
    stage.attention_mode = "sparse"
    loss = stage(ids, pos, ids.roll(-1, dims=1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}


@pytest.mark.timeout(600)
def test_training_forward_backward_through_triton_equals_torch(monkeypatch):
    cfg = small_cfg(vocab_size=97, n_layers=4, compress_ratios=(0, 4, 8, 4, 0))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=gen)
    pos = torch.arange(24)[None]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    want_loss, want = _train_pass(cfg, ids, pos)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = {"attention": 0, "attention_backward": 0, "indexer": 0}
    attn_mod, idx_mod = kernels.triton_module("triton_attention"), kernels.triton_module("triton_indexer")

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(attn_mod, "sparse_attention", count("attention", attn_mod.sparse_attention))
    monkeypatch.setattr(attn_mod._SparseAttention, "backward",
                        staticmethod(count("attention_backward", attn_mod._SparseAttention.backward)))
    monkeypatch.setattr(idx_mod, "indexer_topk", count("indexer", idx_mod.indexer_topk))
    got_loss, got = _train_pass(cfg, ids, pos)

    layers = len(cfg.compress_ratios)                  # main layers and the MTP block
    assert calls["attention"] == layers and calls["attention_backward"] == layers
    assert calls["indexer"] == sum(r == 4 for r in cfg.compress_ratios)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
