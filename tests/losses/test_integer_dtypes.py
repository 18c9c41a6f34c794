"""Labels and miner indices of any integer dtype give the int64 value, through every part
of PML that indexes with them (``ClassWeightedReducer``: ``weights[labels[indices]]``, which
reads uint8 as a mask and refuses int8/int16; ``convert_to_weights`` for miners)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import ClassWeightedReducer

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import ArcFaceLoss, CenterLoss, CircleLoss
from tests.losses.specs import SPEC_IDS, SPECS

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32]
C = 5

BUILDERS = {spec.id: (lambda spec=spec, **kw: spec.build(C, 8, **kw)) for spec in SPECS}
BUILDERS["center"] = lambda **kw: CenterLoss(C, 8, **kw)
BUILDERS["circle"] = lambda **kw: CircleLoss(**kw)


def _value(name: str, labels: torch.Tensor, indices=None, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    loss = BUILDERS[name](**kwargs).double().eval()  # no state update between the calls
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(labels), 8, generator=gen, dtype=torch.float64)
    return loss(x, labels, indices).detach()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*SPEC_IDS, "center", "circle"])
def test_class_weighted_reducer(name: str, dtype: torch.dtype) -> None:
    # batch size == num_classes: a uint8 mask of the weights would broadcast silently
    labels = torch.tensor([0, 1, 1, 3, 4])
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    expected = _value(name, labels, reducer=ClassWeightedReducer(weights))
    got = _value(name, labels.to(dtype), reducer=ClassWeightedReducer(weights))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [*SPEC_IDS, "center", "circle"])
def test_miner_indices(name: str, dtype: torch.dtype) -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])
    x = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1)).double()
    pairs = MultiSimilarityMiner(epsilon=1.0)(x, labels)
    assert all(len(p) for p in pairs)
    expected = _value(name, labels, pairs)
    got = _value(name, labels.to(dtype), tuple(p.to(dtype) for p in pairs))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sharded_loss_in_one_process(dtype: torch.dtype) -> None:
    labels = torch.tensor([0, 1, 1, 3, 4])
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    torch.manual_seed(0)
    sharded = ShardedMarginSoftmaxLoss(
        ArcFaceLoss, C, 8, reducer=ClassWeightedReducer(weights)
    ).double()
    x = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(sharded(x, labels.to(dtype)), sharded(x, labels))


WIDE_UNSIGNED = [torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("dtype", WIDE_UNSIGNED, ids=str)
@pytest.mark.parametrize("name", [*SPEC_IDS, "center"])
def test_wide_unsigned_labels_in_and_out_of_range(name: str, dtype: torch.dtype) -> None:
    """uint16/32/64 labels give the int64 value; out of range, the labels' ValueError (torch's
    aminmax lacks these dtypes on CPU: it was a NotImplementedError)."""
    labels = torch.tensor([0, 1, 2, 4, 1, 0])
    torch.testing.assert_close(_value(name, labels.to(dtype)), _value(name, labels))
    labels[3] = C + 7
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {C}\).*\[0, {C + 7}\]"):
        _value(name, labels.to(dtype))


@pytest.mark.parametrize("dtype", WIDE_UNSIGNED, ids=str)
def test_wide_unsigned_miner_indices_out_of_range(dtype: torch.dtype) -> None:
    labels = torch.tensor([0, 0, 1, 1])
    indices = tuple(torch.tensor([v]).to(dtype) for v in (0, 9, 2))
    with pytest.raises(ValueError, match=r"indices_tuple\[p\] has indices in \[9, 9\]"):
        _value("circle", labels, indices)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("name", ["arcface", "subcenter", "center", "circle"])
def test_float8_embeddings_are_a_type_error(name: str, dtype: torch.dtype) -> None:
    loss = BUILDERS[name]()
    with pytest.raises(TypeError, match=r"embeddings must have dtype torch\.float16, torch\.bfl"):
        loss(torch.randn(4, 8).to(dtype), torch.tensor([0, 0, 1, 1]))


def test_uint64_label_beyond_2_53_is_shown_exactly() -> None:
    labels = torch.tensor([0, 1, 2, 2**53 + 1], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"got values in \[0, 9007199254740993\]"):
        ArcFaceLoss(C, 8)(torch.randn(4, 8), labels)
