"""ElasticFace: sigma = 0 is ArcFace / CosFace exactly; the margins are N(m, sigma) per sample."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.losses import ArcFaceLoss, CosFaceLoss, ElasticFaceLoss
from tests.losses.reference import elastic_arc_cos, normalized_cosine, target_softmax_cross_entropy

C, D, B = 13, 8, 24
MODES = {"default": {}, "chunked": {"chunk_size": 5}, "partial_fc": {"sample_rate": 0.6}}


def _run(loss, x, y, seed: int = 7):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = loss(x, y)
    return (out, *torch.autograd.grad(out, (x, loss.W)))


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(
    ("variant", "margin", "plain"),
    [
        ("arc", 0.5, lambda m, **kw: ArcFaceLoss(C, D, margin=m, scale=32.0, **kw)),
        ("arc", 2.8, lambda m, **kw: ArcFaceLoss(C, D, margin=m, scale=32.0, **kw)),
        ("cos", 0.35, lambda m, **kw: CosFaceLoss(C, D, margin=m, scale=32.0, **kw)),
    ],
    ids=["arc", "arc_beyond_pi", "cos"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sigma_zero_is_arcface_or_cosface_exactly(variant, margin, plain, mode, dtype) -> None:
    torch.manual_seed(0)
    ours = ElasticFaceLoss(C, D, margin, 0.0, 32.0, variant, **mode).to(dtype)
    other = plain(margin, **mode).to(dtype)
    other.load_state_dict(ours.state_dict())
    x = torch.randn(B, D, dtype=dtype)
    y = torch.randint(0, C, (B,))
    for a, b in zip(_run(ours, x, y), _run(other, x, y), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["arc", "cos"])
def test_reproducible_under_manual_seed_and_fresh_each_step(variant: str) -> None:
    loss = ElasticFaceLoss(C, D, variant=variant, sigma=0.1).double()
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    first = _run(loss, x, y, seed=3)
    margins = loss.last_margins.clone()
    again = _run(loss, x, y, seed=3)
    assert torch.equal(loss.last_margins, margins)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    loss(x, y)  # next step: new margins, one per sample
    assert loss.last_margins.shape == (B,) and not torch.equal(loss.last_margins, margins)
    assert len(margins.unique()) == B


@pytest.mark.parametrize(("variant", "margin"), [("arc", 0.5), ("cos", 0.35)])
def test_margins_follow_the_normal_distribution(variant: str, margin: float) -> None:
    loss = ElasticFaceLoss(5, 4, variant=variant, sigma=0.05)
    torch.manual_seed(0)
    loss(torch.randn(20_000, 4), torch.randint(0, 5, (20_000,)))
    drawn = loss.last_margins.double()
    assert loss.margin == margin  # the paper's mean for the variant
    # mean within 4 standard errors, standard deviation within 3%
    assert abs(drawn.mean().item() - margin) < 4 * 0.05 / math.sqrt(20_000)
    assert abs(drawn.std().item() - 0.05) < 0.0015


def test_value_and_gradient_against_the_paper_formula_with_known_margins() -> None:
    """Reference from Eq. (ElasticFace-Arc) with the margins the loss reports it drew."""
    torch.manual_seed(1)
    loss = ElasticFaceLoss(C, D, margin=1.0, sigma=0.8, scale=16.0).double()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,))
    out = loss(x, y)
    margins = loss.last_margins
    assert (margins > math.pi - 1.5).any() or (margins < 0).any()  # both fallbacks exercised
    w = loss.W
    cos = normalized_cosine(x, w)
    target = elastic_arc_cos(cos[torch.arange(B), y], margins)
    ref = target_softmax_cross_entropy(16 * cos, y, 16 * target).mean()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_margin_units_follow_the_variant() -> None:
    assert ElasticFaceLoss(3, 4, margin=0.8, variant="cos").margin == 0.8
    with pytest.raises(ValueError, match=r"radians.*math\.radians"):
        ElasticFaceLoss(3, 4, margin=28.6)
    assert ElasticFaceLoss(3, 4, margin=28.6, variant="cos").margin == 28.6  # a cosine: any >= 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"variant": "angle"}, ValueError, r"variant must be one of \['arc', 'cos'\]"),
        ({"variant": 1}, TypeError, "variant must be a str"),
        ({"sigma": -0.1}, ValueError, "sigma must be >= 0"),
        ({"sigma": math.inf}, ValueError, "sigma must be finite"),
        ({"margin": -0.1}, ValueError, "margin must be >= 0"),
        ({"margin": -0.1, "variant": "cos"}, ValueError, "margin must be >= 0"),
        ({"scale": 0}, ValueError, "scale must be > 0"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message: str) -> None:
    with pytest.raises(error, match=message):
        ElasticFaceLoss(3, 4, **kwargs)


def test_assignments_are_checked_after_construction() -> None:
    loss = ElasticFaceLoss(3, 4)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        loss.margin = -0.2
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        loss.sigma = -1.0
    assert loss.margin == 0.5 and loss.sigma == 0.05
    assert set(loss.state_dict()) == {"W"}


def test_runs_on_the_fused_core() -> None:
    loss = ElasticFaceLoss(C, D)
    assert loss.fused_logits(torch.randn(2, D)) is not None


def test_variant_is_checked_when_set():
    loss_fn = ElasticFaceLoss(5, 4)
    with pytest.raises(ValueError, match="variant must be one of"):
        loss_fn.variant = "typo"
    assert loss_fn.variant == "arc"
    loss_fn.variant = "cos"
    assert loss_fn.variant == "cos" and "variant='cos'" in repr(loss_fn)


def test_arc_fallback_only_where_theta_plus_margin_exceeds_pi() -> None:
    """Unclipped draws may be negative or above pi: the fallback follows theta + m > pi
    for m in [0, pi] (not the cosine test alone); a draw above pi keeps cos(theta + m),
    never a bonus above 1."""
    from pml_margins.losses.elasticface import elastic_arc_target

    theta = torch.linspace(0, math.pi, 41, dtype=torch.float64)
    margins = torch.tensor([-1.0, -0.5, -0.01, 0.0, 0.5, 3.0, 3.5, 4.0], dtype=torch.float64)
    t, m = torch.meshgrid(theta, margins, indexing="ij")
    c = torch.cos(t)
    expected = torch.where(
        (t + m <= math.pi) | (m > math.pi), torch.cos(t + m), c - m * torch.sin(m)
    )
    torch.testing.assert_close(elastic_arc_target(c, m), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(elastic_arc_target(c, m), elastic_arc_cos(c, m))
    assert (elastic_arc_target(c, m) <= 1).all()
    one = torch.tensor([math.cos(3.0)], dtype=torch.float64)
    assert float(elastic_arc_target(one, torch.tensor([-0.5]))) == pytest.approx(math.cos(2.5))


@pytest.mark.parametrize(("variant", "plain"), [("arc", ArcFaceLoss), ("cos", CosFaceLoss)])
def test_eval_mode_applies_the_mean_margin_and_draws_nothing(variant: str, plain) -> None:
    """A validation loss is repeatable and leaves torch's generator where it was; training
    mode draws again."""
    loss = ElasticFaceLoss(C, D, margin=0.3, sigma=0.2, variant=variant).double().eval()
    reference = plain(C, D, margin=0.3).double()
    reference.load_state_dict(loss.state_dict())
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    state = torch.random.get_rng_state()
    first, second = loss(x, y), loss(x, y)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, second) and torch.equal(first, reference(x, y))
    assert loss.last_margins is None
    loss.train()
    assert not torch.equal(loss(x, y), first) and loss.last_margins.shape == (B,)
