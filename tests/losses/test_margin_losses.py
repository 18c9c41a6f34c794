"""Every class-weight loss against its float64 reference from the paper's formula."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import miners, reducers, regularizers

from tests.losses.reference import class_cosine, miner_weights
from tests.losses.specs import SPEC_IDS, SPECS, LossSpec

SHAPES = [(1, 4, 3), (7, 16, 5), (32, 64, 100)]


def _inputs(batch: int, dim: int, classes: int, dtype=torch.float64):
    x = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    return x, y


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_value_and_grad_match_reference_fp64(spec: LossSpec, shape) -> None:
    batch, dim, classes = shape
    loss_fn = spec.build(classes, dim).double()
    x, y = _inputs(batch, dim, classes)
    ours = loss_fn(x, y)
    ref = spec.reference(loss_fn, x, y).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(ours, (x, loss_fn.W))
    ref_grads = torch.autograd.grad(ref, (x, loss_fn.W))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_fp32_close_to_fp64_reference(spec: LossSpec) -> None:
    loss_fn = spec.build(50, 32)
    x, y = _inputs(24, 32, 50, torch.float32)
    ours = loss_fn(x, y)
    assert ours.dtype == torch.float32
    ref = spec.reference(loss_fn, x.double(), y).mean()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-4)
    g_ours = torch.autograd.grad(ours, x)[0]
    g_ref = torch.autograd.grad(ref, x)[0]
    torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize(
    "miner",
    [
        miners.MultiSimilarityMiner(epsilon=0.5),
        miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
        miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    ],
    ids=["multi_similarity", "triplets", "pairs"],
)
def test_miner_indices_become_per_sample_weights(spec: LossSpec, miner) -> None:
    loss_fn = spec.build(6, 8).double()
    x, y = _inputs(20, 8, 6)
    y = torch.arange(20) % 6
    indices_tuple = miner(x, y)
    ours = loss_fn(x, y, indices_tuple)
    weights = miner_weights(indices_tuple, 20)
    ref = (spec.reference(loss_fn, x, y) * weights).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0], rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_gradcheck_fp64(spec: LossSpec) -> None:
    # eval: AdaCos's dynamic scale is a constant of the step, set from x and W without
    # gradient; in training mode the finite differences would move it
    loss_fn = spec.build(4, 5).double().eval()
    x, y = _inputs(3, 5, 4)
    w = loss_fn.W.detach().clone().requires_grad_(True)
    # AdaFace's norm is a quality proxy without gradient: the finite differences must not
    # move it, so x enters as a direction at fixed norms
    norms = x.detach().norm(dim=1, keepdim=True) if spec.kind == "adaface" else None

    def loss_of(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        if norms is not None:
            x_ = x_ / x_.norm(dim=1, keepdim=True) * norms
        torch.manual_seed(0)  # the same draw each call (ElasticFace's margins)
        return torch.func.functional_call(loss_fn, {"W": w_}, (x_, y))

    assert torch.autograd.gradcheck(loss_of, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_reducers_and_regularizers(spec: LossSpec) -> None:
    loss_fn = spec.build(
        5,
        8,
        reducer=reducers.SumReducer(),
        weight_regularizer=regularizers.RegularFaceRegularizer(),
        weight_reg_weight=0.5,
        embedding_regularizer=regularizers.LpRegularizer(),
        embedding_reg_weight=0.25,
    ).double()
    x, y = _inputs(10, 8, 5)
    ours = loss_fn(x, y)
    ref = spec.reference(loss_fn, x, y).sum()
    ref = ref + 0.5 * regularizers.RegularFaceRegularizer()(loss_fn.W.t())
    ref = ref + 0.25 * regularizers.LpRegularizer()(x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_get_logits_predicts_classes(spec: LossSpec) -> None:
    loss_fn = spec.build(7, 8).double()
    x, _ = _inputs(9, 8, 7)
    logits = loss_fn.get_logits(x)
    assert logits.shape == (9, 7)
    # without margin the logits' ranking is the ranking of W_j^T x (+b) or cos(theta_j)
    if spec.kind == "softmax":
        expected = x @ loss_fn.W + (loss_fn.bias if loss_fn.bias is not None else 0)
    else:
        expected = class_cosine(x, loss_fn.W, spec.columns_per_class)
    torch.testing.assert_close(logits.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_state_dict_round_trip_is_exact(spec: LossSpec) -> None:
    a = spec.build(6, 8)
    b = spec.build(6, 8)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    x, y = _inputs(5, 8, 6, torch.float32)
    torch.manual_seed(0)  # the same draw for both (ElasticFace's margins)
    out_a = a(x, y)
    torch.manual_seed(0)
    assert torch.equal(out_a, b(x, y))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_extra_repr_shows_settings(spec: LossSpec) -> None:
    text = repr(spec.build(6, 8))
    assert "num_classes=6" in text and "embedding_size=8" in text
    for name in spec.kwargs:
        assert f"{name}=" in text


def test_collect_stats_records_average_angle() -> None:
    from pml_margins.losses import ArcFaceLoss

    loss_fn = ArcFaceLoss(3, 4, collect_stats=True).double()
    w = loss_fn.W.detach()
    x = w.t()[[0, 1, 2]].clone()
    loss_fn(x, torch.tensor([0, 1, 2]))
    assert loss_fn.avg_angle == pytest.approx(0.0, abs=1e-5)
