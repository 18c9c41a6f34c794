"""Where PML has the same loss with the same definition, values and gradients match."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)

import pml_margins.functional.fused_margin_softmax as fused_module
from pml_margins.functional import (
    arcface_target,
    cosface_target,
    fused_margin_softmax_cross_entropy,
)
from pml_margins.losses import (
    ArcFaceLoss,
    CosFaceLoss,
    NormSoftmaxLoss,
    SoftmaxLoss,
    SphereFaceLoss,
)

PAIRS = [
    ("arcface", lambda: pml_losses.ArcFaceLoss(12, 16, margin=28.6, scale=64),
     lambda: ArcFaceLoss(12, 16, margin=math.radians(28.6), scale=64)),
    ("arcface_large", lambda: pml_losses.ArcFaceLoss(12, 16, margin=70.0, scale=30),
     lambda: ArcFaceLoss(12, 16, margin=math.radians(70.0), scale=30)),
    ("cosface", lambda: pml_losses.CosFaceLoss(12, 16, margin=0.35, scale=64),
     lambda: CosFaceLoss(12, 16, margin=0.35, scale=64)),
    ("nsl", lambda: pml_losses.NormalizedSoftmaxLoss(12, 16, temperature=0.05),
     lambda: NormSoftmaxLoss(12, 16, scale=20.0)),
    ("sphereface", lambda: pml_losses.SphereFaceLoss(12, 16, margin=4),
     lambda: SphereFaceLoss(12, 16, margin=4)),
    ("sphereface_m3", lambda: pml_losses.SphereFaceLoss(12, 16, margin=3),
     lambda: SphereFaceLoss(12, 16, margin=3)),
    ("sphereface_scale", lambda: pml_losses.SphereFaceLoss(12, 16, margin=4, scale=0.5),
     lambda: SphereFaceLoss(12, 16, margin=4, scale=0.5)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make_pml", "make_ours"), PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("use_miner", [False, True], ids=["labels", "miner"])
@pytest.mark.parametrize("path", ["default", "blocked"])
def test_equal_to_pml(name, make_pml, make_ours, dtype, use_miner, path, monkeypatch) -> None:
    """``blocked``: the blocked function with several blocks, which default mode runs at
    real sizes (at these it materializes the logits)."""
    if path == "blocked":  # (not the one-node dense function either: found by review)
        monkeypatch.setattr(fused_module, "MATERIALIZE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(fused_module, "DENSE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(fused_module, "_CPU_BLOCK_ELEMENTS", 5 * 40)
    pml, ours = make_pml().to(dtype), make_ours().to(dtype)
    ours.load_state_dict(pml.state_dict())
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    y = torch.arange(40) % 12
    tuples = miners.MultiSimilarityMiner(0.3)(x, y) if use_miner else None
    out_pml, out_ours = pml(x, y, tuples), ours(x, y, tuples)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    assert_same_value_and_grads(out_ours, out_pml, ours, pml, x, tol)


def assert_same_value_and_grads(out_ours, out_pml, ours, pml, x, tol) -> None:
    """The two losses' values, and their gradients in ``x`` and in each one's ``W``."""
    torch.testing.assert_close(out_ours, out_pml, **tol)
    for a, b in zip(
        torch.autograd.grad(out_ours, (x, ours.W)),
        torch.autograd.grad(out_pml, (x, pml.W)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(("name", "make_pml", "make_ours"), PAIRS, ids=[p[0] for p in PAIRS])
def test_state_dicts_load_both_ways(name, make_pml, make_ours) -> None:
    pml, ours = make_pml(), make_ours()
    assert set(pml.state_dict()) == set(ours.state_dict()) == {"W"}
    ours.load_state_dict(pml.state_dict())
    assert torch.equal(ours.W, pml.W)
    trained = make_ours()
    pml.load_state_dict(trained.state_dict())
    assert torch.equal(pml.W, trained.W)
    assert ours.W.shape == (16, 12)


def test_pml_loses_fp32_master_weights_under_autocast_but_ours_keep_them() -> None:
    model = torch.nn.Linear(16, 16)
    pml = pml_losses.ArcFaceLoss(12, 16)
    ours = ArcFaceLoss(12, 16)
    ours.load_state_dict(pml.state_dict())
    w0 = pml.W.detach().clone()
    y = torch.arange(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pml(model(torch.randn(8, 16)), y)
        ours(model(torch.randn(8, 16)), y)
    assert pml.W.dtype == torch.bfloat16 and not torch.equal(pml.W.float(), w0)  # PML's defect
    assert ours.W.dtype == torch.float32 and torch.equal(ours.W, w0)


# --- every distance PML accepts gives PML's value --------------------------------------
NSL_DISTANCES = {
    "default": lambda: None,
    "dot_unnormalized": lambda: DotProductSimilarity(normalize_embeddings=False),
    "dot": lambda: DotProductSimilarity(),
    "cosine": lambda: CosineSimilarity(),
    "cosine_power2": lambda: CosineSimilarity(power=2),
    "lp": lambda: LpDistance(),
    "lp_squared": lambda: LpDistance(power=2),
    "lp_unnormalized": lambda: LpDistance(normalize_embeddings=False),
    "snr": lambda: SNRDistance(),
}
MARGIN_DISTANCES = {
    "default": lambda: None,
    "cosine": lambda: CosineSimilarity(),
    "cosine_power2": lambda: CosineSimilarity(power=2),
}
#: the NSL distances that run on the fused core (so chunk_size applies)
FUSED_NSL_DISTANCES = ["default", "dot_unnormalized", "dot", "cosine"]


def _with_distance(make, distance):
    kwargs = {} if distance is None else {"distance": distance}
    return make(**kwargs)


def _assert_same_loss_and_grads(pml, ours, x, y, tol) -> None:
    ours.load_state_dict(pml.state_dict())
    assert_same_value_and_grads(ours(x, y), pml(x, y), ours, pml, x, tol)


@pytest.mark.parametrize(
    ("distance", "chunk_size"),
    [(d, None) for d in NSL_DISTANCES] + [(d, 5) for d in FUSED_NSL_DISTANCES],
)
def test_nsl_equals_pml_for_every_distance(distance, chunk_size) -> None:
    torch.manual_seed(0)
    make_distance = NSL_DISTANCES[distance]
    pml = _with_distance(
        lambda **kw: pml_losses.NormalizedSoftmaxLoss(12, 16, temperature=0.1, **kw),
        make_distance(),
    ).double()
    ours = _with_distance(
        lambda **kw: NormSoftmaxLoss(12, 16, scale=10.0, **kw), make_distance()
    ).double()
    fused = ours.fused_logits(torch.zeros(1, 16)) is not None
    assert fused == (distance in FUSED_NSL_DISTANCES)
    ours.chunk_size = chunk_size
    x = (3 * torch.randn(20, 16, dtype=torch.float64)).requires_grad_(True)
    y = torch.arange(20) % 12
    _assert_same_loss_and_grads(pml, ours, x, y, {"rtol": 1e-10, "atol": 1e-10})


MARGIN_PAIRS = {
    "arcface": (
        lambda **kw: pml_losses.ArcFaceLoss(12, 16, margin=28.6, scale=30, **kw),
        lambda **kw: ArcFaceLoss(12, 16, margin=math.radians(28.6), scale=30, **kw),
    ),
    "cosface": (
        lambda **kw: pml_losses.CosFaceLoss(12, 16, margin=0.35, scale=30, **kw),
        lambda **kw: CosFaceLoss(12, 16, margin=0.35, scale=30, **kw),
    ),
    "sphereface": (
        lambda **kw: pml_losses.SphereFaceLoss(12, 16, margin=4, **kw),
        lambda **kw: SphereFaceLoss(12, 16, margin=4, **kw),
    ),
}


@pytest.mark.parametrize("distance", MARGIN_DISTANCES, ids=list(MARGIN_DISTANCES))
@pytest.mark.parametrize("name", MARGIN_PAIRS)
def test_margin_losses_equal_pml_for_every_cosine_distance(name, distance) -> None:
    torch.manual_seed(0)
    make_pml, make_ours = MARGIN_PAIRS[name]
    make_distance = MARGIN_DISTANCES[distance]
    pml = _with_distance(make_pml, make_distance()).double()
    ours = _with_distance(make_ours, make_distance()).double()
    x = (3 * torch.randn(20, 16, dtype=torch.float64)).requires_grad_(True)
    y = torch.arange(20) % 12
    _assert_same_loss_and_grads(pml, ours, x, y, {"rtol": 1e-9, "atol": 1e-9})


@pytest.mark.parametrize("name", MARGIN_PAIRS)
@pytest.mark.parametrize("distance", [LpDistance, DotProductSimilarity, SNRDistance])
def test_margin_losses_reject_what_pml_rejects(name, distance) -> None:
    _, make_ours = MARGIN_PAIRS[name]
    with pytest.raises(TypeError, match="needs a CosineSimilarity distance"):
        make_ours(distance=distance())


def _softmax_logits_by_rule(distance: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` logits of a softmax over a PML distance, written out per distance: a
    similarity as it is, a distance negated (PML's rule in NormalizedSoftmaxLoss)."""
    unit_x, unit_w = x / x.norm(dim=1, keepdim=True), w / w.norm(dim=0, keepdim=True)
    if distance in ("default", "dot_unnormalized"):
        return x @ w
    if distance in ("dot", "cosine"):
        return unit_x @ w / w.norm(dim=0, keepdim=True)  # both sides normalized
    if distance == "cosine_power2":
        return (unit_x @ unit_w) ** 2
    if distance == "lp":
        return -torch.cdist(unit_x, unit_w.t())
    if distance == "lp_squared":
        return -(torch.cdist(unit_x, unit_w.t()) ** 2)
    if distance == "lp_unnormalized":
        return -torch.cdist(x, w.t())
    assert distance == "snr"  # Var(b - a) / Var(a) of the unit rows, unbiased variances
    diff = unit_w.t().unsqueeze(0) - unit_x.unsqueeze(1)
    return -diff.var(dim=2) / unit_x.var(dim=1, keepdim=True)


@pytest.mark.parametrize("distance", NSL_DISTANCES, ids=list(NSL_DISTANCES))
def test_softmax_loss_takes_any_distance_as_a_logit_or_its_negation(distance) -> None:
    """A distance that is not a similarity (Lp, SNR) gives the nearer class the larger
    logit: with W at the class centres, the own class wins."""
    torch.manual_seed(0)
    make_distance = NSL_DISTANCES[distance]
    loss = _with_distance(lambda **kw: SoftmaxLoss(4, 8, **kw), make_distance()).double()
    centres = 4 * torch.randn(4, 8, dtype=torch.float64)
    y = torch.arange(32) % 4
    x = (centres[y] + 0.3 * torch.randn(32, 8, dtype=torch.float64)).requires_grad_(True)
    with torch.no_grad():
        loss.W.copy_(centres.t())
    logits = _softmax_logits_by_rule(distance, x, loss.W) + loss.bias
    expected = torch.nn.functional.cross_entropy(logits, y)
    value = loss(x, y)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(value, (x, loss.W, loss.bias)),
        torch.autograd.grad(expected, (x, loss.W, loss.bias)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if distance.startswith(("lp", "snr")):
        assert (loss.get_logits(x.detach()).argmax(1) == y).all()


@pytest.mark.parametrize("materialize", [True, False], ids=["dense", "blocked"])
@pytest.mark.parametrize(
    ("name", "degrees"), [("arcface", -40.0), ("arcface", -5.0), ("cosface", -0.2)]
)
def test_a_negative_margin_through_the_functional_core_equals_pml(
    materialize, name, degrees, monkeypatch
) -> None:
    """The loss classes refuse a negative margin (issue 2); the functional target-logit
    functions take one ("Negative Margin Matters"), with PML's values and gradients. For
    ArcFace with embeddings opposite their class weights (theta near pi): with m < 0,
    theta + m never passes pi, so PML keeps cos(theta + m) where a positive margin's
    fallback would apply."""
    if not materialize:
        monkeypatch.setattr(fused_module, "_CPU_BLOCK_ELEMENTS", 5 * 40)
    if name == "arcface":
        pml = pml_losses.ArcFaceLoss(12, 16, margin=degrees, scale=8).double()
        target = functools.partial(arcface_target, margin=math.radians(degrees))
    else:
        pml = pml_losses.CosFaceLoss(12, 16, margin=degrees, scale=8).double()
        target = functools.partial(cosface_target, margin=degrees)
    y = torch.arange(40) % 12
    g = torch.Generator().manual_seed(3)
    noise = 0.01 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    x = (-pml.W.detach().t()[y] + noise).requires_grad_()
    if name == "arcface":
        cosine = torch.nn.functional.cosine_similarity(x.detach(), pml.W.detach().t()[y])
        assert (cosine < -math.cos(math.radians(degrees))).all()  # where a fallback would apply
    w = pml.W.detach().clone().requires_grad_()
    ours = fused_margin_softmax_cross_entropy(x, w, y, target, 8.0, materialize=materialize).mean()
    expected = pml(x, y)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(ours, expected, **tol)
    for a, b in zip(
        torch.autograd.grad(ours, (x, w)), torch.autograd.grad(expected, (x, pml.W)), strict=True
    ):
        torch.testing.assert_close(a, b, **tol)
