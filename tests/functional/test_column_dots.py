"""The column dot products of the fused core's ``W`` passes, through a reused buffer."""

import pytest
import torch

from pml_margins.functional.fused_margin_softmax import column_dots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 7, 300])
def test_equal_to_vecdot_bit_for_bit_on_strided_blocks(dtype, width):
    gen = torch.Generator().manual_seed(width)
    whole = torch.randn(33, 1000, generator=gen, dtype=dtype) * 1e3 + 5
    other = torch.randn(33, 1000, generator=gen, dtype=dtype)
    scratch = torch.full((33 * 400,), float("nan"), dtype=dtype)  # larger than any block
    for start in (0, 11, 1000 - width):
        a, b = whole[:, start : start + width], other[:, start : start + width]
        expected = torch.linalg.vecdot(a, b, dim=0)
        assert torch.equal(column_dots(a, b, scratch), expected)
        assert torch.equal(column_dots(a, a, scratch), torch.linalg.vecdot(a, a, dim=0))
        assert torch.equal(column_dots(a, b), expected)  # no buffer: vecdot itself


def test_a_buffer_reused_across_blocks_leaves_no_trace():
    gen = torch.Generator().manual_seed(0)
    scratch = torch.empty(8 * 50)
    first = torch.randn(8, 50, generator=gen)
    small = torch.randn(8, 3, generator=gen)
    column_dots(first, first, scratch)
    assert torch.equal(column_dots(small, small, scratch), (small * small).sum(0))
