"""torch.func transforms (grad, jvp, hessian, per-sample gradients by vmap(grad)) on every
loss: inside a transform the losses take their plain autograd paths by themselves."""

from __future__ import annotations

import pytest
import torch

import pml_margins
from pml_margins.functional import safe_sine
from pml_margins.losses import AdaCosLoss, CenterLoss, CircleLoss, ProxyCircleLoss
from tests.losses.specs import SPECS

B, D, C = 6, 5, 4
LABELS = torch.tensor([0, 1, 2, 0, 1, 3])
BUILDS = {s.id: (lambda s=s: s.build(C, D)) for s in SPECS} | {
    "center": lambda: CenterLoss(C, D),
    "circle": lambda: CircleLoss(),
    "proxy_circle": lambda: ProxyCircleLoss(C, D),
}
#: running statistics updated in training mode: the transforms run them in eval mode
UPDATES_IN_TRAINING = {"adacos", "adaface", "adaface_spread", "curricularface"}
UPDATES_IN_TRAINING |= {"curricularface_fast_t", "center"}
RANDOM = {i for i in BUILDS if i.startswith("elasticface")}  # a margin drawn each step


def _loss(name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    loss = BUILDS[name]().double()
    if name in UPDATES_IN_TRAINING:
        loss(torch.randn(B, D, dtype=torch.float64), LABELS)  # statistics off their start
        loss.eval()
    return loss


def _embeddings() -> torch.Tensor:
    return torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", BUILDS)
def test_grad_equals_autograd(name: str) -> None:
    loss, x = _loss(name), _embeddings()
    torch.manual_seed(2)
    grad, value = torch.func.grad_and_value(lambda e: loss(e, LABELS))(x)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(2)
    expected = loss(leaf, LABELS)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, leaf)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", BUILDS)
def test_jvp_and_hessian_equal_autograd_twice(name: str) -> None:
    """Forward mode and second derivatives: those of the autograd-only path (twice
    differentiable), from ``torch.autograd.functional``."""
    loss, x = _loss(name), _embeddings()
    v = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(2)
    _, tangent = torch.func.jvp(lambda e: loss(e, LABELS), (x,), (v,))
    with pml_margins.autograd_only():
        torch.manual_seed(2)
        _, expected = torch.autograd.functional.jvp(lambda e: loss(e, LABELS), x, v)
        if name not in RANDOM:  # hessian vmaps over a random draw: torch refuses it
            hessian = torch.func.hessian(lambda e: loss(e, LABELS))(x)
            expected_h = torch.autograd.functional.hessian(lambda e: loss(e, LABELS), x)
            torch.testing.assert_close(hessian, expected_h, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", [n for n in BUILDS if n not in RANDOM and n != "circle"])
def test_per_sample_gradients_by_vmap(name: str) -> None:
    """Opacus-style per-sample gradients, each the gradient of its one-row loss (Circle
    needs pairs within a batch, ElasticFace draws at random: not per-sample losses)."""
    loss, x = _loss(name), _embeddings()
    per_sample = torch.func.vmap(torch.func.grad(lambda e, t: loss(e[None], t[None])))(x, LABELS)
    for i in range(B):
        row = x[i : i + 1].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(loss(row, LABELS[i : i + 1]), row)
        torch.testing.assert_close(per_sample[i], expected[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per_anchor", [True, False])
@pytest.mark.parametrize("reducer", ["default", "mean"])
def test_circle_under_vmap_equals_a_loop(per_anchor: bool, reducer: str) -> None:
    """Circle's pairs are data-dependent: inside a transform it runs on fixed-shape masks
    (and PML's AvgNonZeroReducer, its default, as a fixed-shape mean), so vmap batches it:
    over several batches, and per-sample gradients against a reference set (found by
    review: a raw functorch error from the boolean indexing and the pair count's read)."""
    from pytorch_metric_learning.reducers import MeanReducer

    kwargs = {} if reducer == "default" else {"reducer": MeanReducer()}
    loss = CircleLoss(per_anchor=per_anchor, **kwargs)
    gen = torch.Generator().manual_seed(5)
    batches = torch.randn(3, 8, D, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    values = torch.func.vmap(lambda e: loss(e, labels))(batches)
    grads = torch.func.vmap(torch.func.grad(lambda e: loss(e, labels)))(batches)
    for batch, value, grad in zip(batches, values, grads, strict=True):
        leaf = batch.clone().requires_grad_(True)
        expected = loss(leaf, labels)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            grad, torch.autograd.grad(expected, leaf)[0], rtol=1e-9, atol=1e-12
        )
    ref = torch.randn(10, D, dtype=torch.float64, generator=gen)
    ref_labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    x = batches[0]

    def one_row(e, t):
        return loss(e[None], t[None], ref_emb=ref, ref_labels=ref_labels)

    per_sample = torch.func.vmap(torch.func.grad(one_row))(x, labels)
    for i in range(len(x)):
        row = x[i].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(one_row(row, labels[i]), row)
        torch.testing.assert_close(per_sample[i], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bounds", [{"high": 2.0}, {"low": 0.5}], ids=str)
def test_an_avg_non_zero_reducer_with_other_bounds_keeps_pml_s_reduction(bounds) -> None:
    """Only PML's own AvgNonZeroReducer (low 0, no high) is reduced in fixed shapes inside
    a transform; other bounds go through PML's reducer, so grad equals eager autograd
    (found by review: a plain mean of the positive losses, 8.2 off)."""
    from pytorch_metric_learning.reducers import AvgNonZeroReducer

    reducer = AvgNonZeroReducer()
    if "high" in bounds:
        reducer = AvgNonZeroReducer(high=bounds["high"])
    else:
        reducer.low = bounds["low"]
    loss = BUILDS["arcface"]().double()
    loss.reducer = reducer
    x = _embeddings()
    value, grad = torch.func.grad_and_value(lambda e: loss(e, LABELS))(x)[::-1]
    leaf = x.clone().requires_grad_(True)
    expected = loss(leaf, LABELS)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, leaf)[0], rtol=1e-9, atol=1e-12)


def test_circle_in_a_transform_gives_a_set_without_pairs_zero_and_zero_gradients() -> None:
    loss = CircleLoss()
    x = torch.randn(2, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    labels = torch.arange(4)  # no positive pair
    values, grads = torch.func.vmap(torch.func.grad_and_value(lambda e: loss(e, labels)))(x)[::-1]
    assert torch.equal(values, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(grads, torch.zeros_like(x))


@pytest.mark.parametrize("name", sorted(UPDATES_IN_TRAINING))
def test_running_statistics_in_training_mode_are_refused_with_the_remedy(name: str) -> None:
    torch.manual_seed(1)
    loss = BUILDS[name]().double()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"torch\.func transform.*loss\.eval\(\)"):
        torch.func.grad(lambda e: loss(e, LABELS))(_embeddings())
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key])


def test_value_checks_read_the_values_inside_transforms() -> None:
    loss = _loss("arcface")
    bad = _embeddings()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.func.grad(lambda e: loss(e, LABELS))(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.func.vmap(torch.func.grad(lambda e, t: loss(e[None], t[None])))(bad, LABELS)
    out_of_range = LABELS.clone()
    out_of_range[4] = C
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        torch.func.vmap(lambda e, t: loss(e[None], t[None]))(_embeddings(), out_of_range)


def test_safe_sine_is_differentiable_to_any_order() -> None:
    """d sin / d cos = -cos / sin, d^2 sin / d cos^2 = -1 / sin^3; 0 at exactly +-1 only:
    sines of 1.5e-8 (the smallest above 0 in float64), 4.5e-7 and 2e-6 keep their slopes
    (a fixed cut-off of 1e-6 dropped ArcFace's sin(m) cos/sin term there, found by review:
    the gradient of a row within 1e-6 rad of its class pointed 143% off)."""
    near = [1.0 - 2.0**-53, 1.0 - 1e-13, 1.0 - 2e-12, -(1.0 - 8e-12)]
    c = torch.tensor([-1.0, -0.6, 0.0, 0.3, 0.9, *near, 1.0], dtype=torch.float64)
    s = torch.sqrt((1 - c) * (1 + c))
    assert 1e-8 < s[5] < 2e-8 and (s[6:9] > 4e-7).all() and (s[6:9] < 5e-6).all()
    first = torch.vmap(torch.func.grad(safe_sine))(c)
    second = torch.vmap(torch.func.grad(torch.func.grad(safe_sine)))(c)
    inside = s > 0
    assert inside.sum() == len(c) - 2
    torch.testing.assert_close(first[inside], -c[inside] / s[inside])
    torch.testing.assert_close(second[inside], -1 / s[inside] ** 3)
    assert (first[~inside] == 0).all() and (second[~inside] == 0).all()
    torch.testing.assert_close(safe_sine(c), s, rtol=0, atol=1e-15)


def test_elasticface_keeps_plain_margins_after_a_transform() -> None:
    import copy

    loss = _loss("elasticface_arc")
    torch.func.grad(lambda e: loss(e, LABELS))(_embeddings())
    assert not torch._C._functorch.is_functorch_wrapped_tensor(loss.last_margins)
    assert loss.last_margins.shape == (B,)
    copy.deepcopy(loss)  # a functorch wrapper left on the module cannot be copied


@pytest.mark.parametrize("name", ["adacos", "adaface", "curricularface"])
@pytest.mark.parametrize("mode", [{"chunk_size": 2}, {"sample_rate": 0.5}], ids=str)
def test_a_refused_plain_path_call_moves_no_running_statistic(name: str, mode: dict) -> None:
    """chunk_size/sample_rate are refused on the plain path: before the step updates its
    buffers (a caller retrying outside autograd_only() got another loss)."""
    torch.manual_seed(1)
    loss = BUILDS[name]().double()
    loss.chunk_size, loss.sample_rate = mode.get("chunk_size"), mode.get("sample_rate", 1.0)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with pml_margins.autograd_only(), pytest.raises(ValueError, match="plain path"):
        loss(_embeddings(), LABELS)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_refused_distance_moves_no_running_statistic() -> None:
    """A distance the fused core does not declare, with chunk_size: refused before the
    step's update (a CosineSimilarity subclass is not PML's plain one)."""
    from pytorch_metric_learning.distances import CosineSimilarity

    class MyCosine(CosineSimilarity):
        pass

    loss = AdaCosLoss(C, D, chunk_size=2, distance=MyCosine())
    before = loss.scale.clone()
    with pytest.raises(ValueError, match="runs on the plain path with MyCosine"):
        loss(_embeddings().float(), LABELS)
    assert torch.equal(loss.scale, before)
