"""parallel.te_layers: which linears become Transformer Engine layers, and that names, shapes and values stay.

Transformer Engine is not installed here (it needs CUDA): ``_TeStandIn`` mimics the constructor and the
parameter layout of ``transformer_engine.pytorch.Linear`` (``weight [out_local, in_local]``, ``bias
[out_local]``, split by ``parallel_mode`` over ``tp_size``), the only part of TE the swap relies on.
"""

import types

import pytest
import torch
from torch import nn

from support.model import small_cfg
from v4train.model import V4Stage
from v4train.parallel.fp8 import FP32_MODULE_NAMES, enable_fp8
from v4train.parallel.te_layers import enable_te_fp8, plan_te_swaps


class _TeStandIn(nn.Module):
    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None, parallel_mode=None,
                 tp_group=None, tp_size=1):
        super().__init__()
        out_local = out_features // tp_size if parallel_mode == "column" else out_features
        in_local = in_features // tp_size if parallel_mode == "row" else in_features
        self.weight = nn.Parameter(torch.full((out_local, in_local), float("nan"), dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_local, dtype=params_dtype, device=device)) if bias else None

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


TE = types.SimpleNamespace(Linear=_TeStandIn)


def _stage():
    torch.manual_seed(0)
    stage = V4Stage(small_cfg(vocab_size=64), pp_rank=0, pp_size=1)
    stage.init_weights(5)
    stage.attention_mode = "sparse"
    return stage


def test_the_swapped_linears_are_those_fp8_emulates():
    names = [s.name for s in plan_te_swaps(_stage())]
    assert names == enable_fp8(_stage())
    assert names and all(not FP32_MODULE_NAMES.intersection(n.split(".")) for n in names)
    assert any(".attn." in n for n in names) and any(".experts." in n for n in names)


def test_names_shapes_and_values_are_kept_so_checkpoints_interchange():
    plain, te = _stage(), _stage()
    swapped = enable_te_fp8(te, te=TE)
    assert all(isinstance(te.get_submodule(n), _TeStandIn) and te.get_submodule(n).te_fp8 for n in swapped)
    want, got = plain.state_dict(), te.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # an FP8 run's checkpoint resumes without FP8 and the reverse (strict: same names and shapes)
    other = _stage()
    enable_te_fp8(other, te=TE)
    plain.load_state_dict(te.state_dict(), strict=True)
    other.load_state_dict(plain.state_dict(), strict=True)
    assert enable_te_fp8(te, te=TE) == []          # a second call finds nothing left to swap


def test_the_swapped_stage_computes_what_the_plain_one_does():
    plain, te = _stage(), _stage()
    enable_te_fp8(te, te=TE)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(16)[None]
    torch.testing.assert_close(te(ids, pos, ids), plain(ids, pos, ids), rtol=0, atol=0)


def test_a_layer_whose_parameters_differ_is_refused():
    class Wrong(_TeStandIn):
        def __init__(self, in_features, out_features, **kwargs):
            super().__init__(out_features, in_features, **kwargs)      # transposed weight

    with pytest.raises(ValueError, match="TE parameters"):
        enable_te_fp8(_stage(), te=types.SimpleNamespace(Linear=Wrong))
