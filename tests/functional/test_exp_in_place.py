"""exp_in_place / exp_of: e^x to float rounding, in place, on every path they choose."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.functional.margin_softmax import EXP2_MIN_ELEMENTS, exp_in_place, exp_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [EXP2_MIN_ELEMENTS - 1, EXP2_MIN_ELEMENTS, 1 << 17])
def test_matches_float64_exp_where_terms_count(dtype: torch.dtype, size: int) -> None:
    # logits minus their maximum: 0 down to -120 (past float32's normal range), both ends
    x = torch.linspace(-120.0, 0.0, size, dtype=torch.float64).to(dtype)
    want = torch.exp(x.double())
    got = exp_in_place(x.clone()).double()
    u = torch.finfo(dtype).eps
    # the product's rounding: at most |x| u relative, plus exp2's own few units
    normal = want > torch.finfo(dtype).tiny
    bound = (x.double().abs() + 4) * u
    assert bool(((got - want).abs()[normal] <= bound[normal] * want[normal]).all())
    assert bool(((got - want).abs()[~normal] <= torch.finfo(dtype).tiny).all())
    assert torch.equal(exp_of(x).double(), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values_and_in_place(dtype: torch.dtype) -> None:
    x = torch.zeros(EXP2_MIN_ELEMENTS, dtype=dtype)
    x[:4] = torch.tensor([-math.inf, math.nan, math.inf, 0.0], dtype=dtype)
    before = x.clone()
    out = exp_of(x)
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # exp_of leaves x alone
    same = exp_in_place(x)
    assert same is x  # in place
    assert out[0] == 0 and out[1].isnan() and out[2] == math.inf and out[3] == 1
    assert torch.equal(out.nan_to_num(), x.nan_to_num())
