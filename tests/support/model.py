"""Small shared builders for the model tests (not a test module)."""

import torch

from v4train.model.attention import Attention
from v4train.model.config import ModelConfig
from v4train.model.layout import SequenceContext

WINDOW = 4


def small_cfg(**overrides):
    """A tiny config whose layers 0..4 are SWA, CSA (m=4), HCA (m'=8), CSA, SWA (MTP)."""
    base = dict(dim=32, n_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=16,
                window=WINDOW, index_n_heads=2, index_head_dim=8, index_topk=3, compress_ratios=(0, 4, 8, 4, 0))
    return ModelConfig.preset("nano", **{**base, **overrides})


def make_attention(layer_idx=0, seed=0, **overrides):
    """Attention of ``small_cfg`` layer ``layer_idx`` with every parameter ~ N(0, 0.3)."""
    attn = Attention(small_cfg(**overrides), layer_idx=layer_idx)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return attn


def run(attn, x, pos, mode="dense"):
    return attn(x, SequenceContext(pos, torch.zeros_like(pos), attention_mode=mode))


def whole_stage(cfg, mode, seed):
    """The whole model as one pipeline stage, initialised from ``seed``, in attention mode ``mode``."""
    from v4train.model import V4Stage

    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(seed)
    stage.attention_mode = mode
    return stage


def next_token_batch(vocab_size, seed, B, S):
    """``(input_ids, position_ids, labels)`` ``[B, S]``: random tokens, one document per row, next-token labels
    (-100 at the end)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, S), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, torch.arange(S).expand(B, S), labels
