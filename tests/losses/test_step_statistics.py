"""StepStatistics' reductions over the classes (one process: the identity)."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.losses import StepStatistics
from pml_margins.losses.step_statistics import _logsumexp_all


@pytest.mark.parametrize("scale", [1.0, 30.0, 64.0])
@pytest.mark.parametrize("blocks", [1, 3])
def test_non_target_logsumexp_equals_the_formula(scale, blocks):
    """log sum over every row and every non-target class of e^(s cos), any column blocks."""
    g = torch.Generator().manual_seed(0)
    cosine = torch.rand(9, 20, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.randint(0, 20, (9,), generator=g)
    stats = StepStatistics(lambda: cosine, target)
    stats.set_class_cosines(list(torch.tensor_split(cosine, blocks, dim=1)))
    mask = torch.ones_like(cosine, dtype=torch.bool)
    mask[torch.arange(9), target] = False
    want = math.log(sum(math.exp(scale * c) for c in cosine[mask].tolist()))
    assert float(stats.non_target_logsumexp(scale)) == pytest.approx(want, rel=1e-12)


def test_whole_tensor_logsumexp_matches_torch_and_edge_cases():
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 30
    torch.testing.assert_close(_logsumexp_all(x.clone()), torch.logsumexp(x.flatten(), 0))
    assert _logsumexp_all(torch.full((3, 4), -math.inf)) == -math.inf
    assert _logsumexp_all(torch.tensor([[5.0]])) == 5.0
    big = torch.tensor([[1e4, 1e4 - 1.0]])  # no overflow: the shift is the maximum
    assert float(_logsumexp_all(big)) == pytest.approx(1e4 + math.log1p(math.exp(-1.0)))
