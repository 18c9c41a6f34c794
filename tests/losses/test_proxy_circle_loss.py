"""ProxyCircleLoss: the class-level Circle loss against its formula (float64, written here)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import SumReducer

from pml_margins.losses import ProxyCircleLoss

F64 = torch.float64


def _setup(b=8, d=5, classes=4, seed=0, dtype=F64, m=0.25, gamma=32.0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, classes, (b,), generator=g)
    loss = ProxyCircleLoss(classes, d, m=m, gamma=gamma, **kwargs).to(dtype)
    return x, y, loss


def ref_losses(x, w, y, m, gamma):
    """log(1 + sum_{j!=y} exp(g a_n^j (s_n^j - m)) * exp(-g a_p (s_p - (1 - m)))), a's detached."""
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=0, keepdim=True))
    out = []
    for i in range(x.shape[0]):
        sp = cos[i, y[i]]
        sn = torch.cat([cos[i, : y[i]], cos[i, y[i] + 1 :]])
        a_p = torch.clamp(1 + m - sp.detach(), min=0)
        a_n = torch.clamp(sn.detach() + m, min=0)
        neg = torch.exp(gamma * a_n * (sn - m)).sum()
        out.append(torch.log(1 + neg * torch.exp(-gamma * a_p * (sp - (1 - m)))))
    return torch.stack(out)


@pytest.mark.parametrize(("m", "gamma"), [(0.25, 32.0), (0.4, 80.0), (0.0, 2.0), (0.25, 128.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradients_match_formula(m, gamma, seed):
    x, y, loss = _setup(seed=seed, m=m, gamma=gamma)
    value = loss(x, y)
    gx, gw = torch.autograd.grad(value, (x, loss.W))
    expected = ref_losses(x, loss.W, y, m, gamma).mean()
    ex, ew = torch.autograd.grad(expected, (x, loss.W))
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, ew, rtol=1e-10, atol=1e-10)


def test_gradient_matches_finite_differences_with_frozen_alphas():
    """The alphas are constants (detached): check against central differences with them frozen."""
    x, y, loss = _setup(b=4, d=3, classes=3, seed=2, gamma=4.0)
    (grad,) = torch.autograd.grad(loss(x, y), x)
    w = loss.W.detach()
    x0 = x.detach()

    def frozen(e):
        cos = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=0, keepdim=True))
        cos0 = (x0 / x0.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=0, keepdim=True))
        total = 0
        for i in range(e.shape[0]):
            others = [j for j in range(3) if j != y[i]]
            a_p = torch.clamp(1.25 - cos0[i, y[i]], min=0)
            a_n = torch.clamp(cos0[i, others] + 0.25, min=0)
            neg = torch.exp(4 * a_n * (cos[i, others] - 0.25)).sum()
            total = total + torch.log1p(neg * torch.exp(-4 * a_p * (cos[i, y[i]] - 0.75)))
        return total / e.shape[0]

    numeric = torch.zeros_like(x0)
    eps = 1e-6
    for k in range(x0.numel()):
        step = torch.zeros(x0.numel(), dtype=F64)
        step[k] = eps
        step = step.view_as(x0)
        numeric.view(-1)[k] = (frozen(x0 + step) - frozen(x0 - step)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [256.0, 1024.0, 4096.0])
def test_large_gamma_finite_and_exact(gamma):
    x, y, loss = _setup(b=16, d=8, classes=6, seed=3, dtype=torch.float32, gamma=gamma)
    value = loss(x, y)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    loss64 = ProxyCircleLoss(6, 8, m=0.25, gamma=gamma).double()
    loss64.load_state_dict(loss.state_dict())
    x64 = x.detach().double()
    torch.testing.assert_close(value.double(), loss64(x64, y), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    x, y, loss = _setup(b=16, d=8, classes=6, seed=4, dtype=torch.float32, gamma=256.0)
    lin = torch.nn.Linear(8, 8)
    try:
        with torch.autocast("cpu", dtype=dtype):
            value = loss(lin(x), y)
    except RuntimeError as err:  # pragma: no cover - fp16 autocast missing on old CPUs
        pytest.skip(f"autocast {dtype} unsupported: {err}")
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.W.grad).all()
    assert loss.W.dtype == torch.float32
    torch.testing.assert_close(value, loss(lin(x), y), rtol=0.05, atol=0.5)


def test_miner_weights_and_reducer_honoured():
    x, y, loss = _setup(b=10, classes=3, seed=5, reducer=SumReducer())
    it = BatchHardMiner()(x, y)
    counts = sum(torch.bincount(t, minlength=10).to(F64) for t in it)
    expected = (ref_losses(x, loss.W, y, 0.25, 32.0) * counts / counts.max()).sum()
    torch.testing.assert_close(loss(x, y, it), expected)


def test_weight_layout_and_state_dict():
    loss = ProxyCircleLoss(7, 3)
    assert loss.W.shape == (3, 7)
    other = ProxyCircleLoss(7, 3)
    other.load_state_dict(loss.state_dict())
    torch.testing.assert_close(other.W, loss.W)


def test_perfect_separation_gives_small_loss():
    """Embeddings on their class weight, classes orthogonal: s_p = 1, s_n = 0."""
    loss = ProxyCircleLoss(3, 3, m=0.25, gamma=64.0)
    with torch.no_grad():
        loss.W.copy_(torch.eye(3))
    value = loss(torch.eye(3), torch.arange(3))
    # z_y = g*m*(1-(1-m)) = g m^2, z_j = g*m*(0-m) = -g m^2: L = log(1 + 2 exp(-2 g m^2))
    expected = torch.log1p(2 * torch.exp(torch.tensor(-2 * 64.0 * 0.25**2)))
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(3, 5), torch.tensor([0, 1, 4])), ValueError, r"\[0, 4\)"),
        ((torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer"),
        ((torch.randn(3, 6), torch.tensor([0, 1, 2])), ValueError, "width 6"),
        ((torch.randn(3, 5), torch.tensor([0, 1])), ValueError, "length 2"),
        ((torch.full((3, 5), float("nan")), torch.tensor([0, 1, 2])), ValueError, "NaN"),
        ((torch.randn(0, 5), torch.tensor([], dtype=torch.long)), ValueError, "empty"),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2]), None, torch.randn(3, 5)),
            ValueError,
            "ref_emb",
        ),
        (
            (torch.randn(3, 5), torch.tensor([0, 1, 2]), (torch.tensor([0]),) * 4 + (None,)),
            ValueError,
            "3 elements",
        ),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        ProxyCircleLoss(4, 5)(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"gamma": 0.0}, ValueError, "gamma must be > 0"),
        ({"m": 1e4}, ValueError, "m must lie in"),
        ({"m": -2000}, ValueError, "m must lie in"),
        ({"num_classes": 0}, ValueError, "num_classes"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, match):
    args = {"num_classes": 4, "embedding_size": 5, **kwargs}
    with pytest.raises(exc, match=match):
        ProxyCircleLoss(**args)


def test_extra_repr():
    assert "num_classes=4, embedding_size=5, m=0.4, gamma=80.0" in repr(
        ProxyCircleLoss(4, 5, m=0.4, gamma=80)
    )


def test_get_logits_are_scaled_cosines():
    x, _, loss = _setup(seed=9)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (loss.W / loss.W.norm(dim=0, keepdim=True))
    torch.testing.assert_close(loss.get_logits(x), 32.0 * cos)


def test_core_non_target_logit_fn():
    """The hook the class-level form uses: identity changes nothing; it maps non-targets only."""
    from pml_margins.functional import margin_softmax_cross_entropy

    logits = torch.randn(5, 4, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 0])
    base = margin_softmax_cross_entropy(logits, labels, lambda t: t - 0.3, 2.0)
    same = margin_softmax_cross_entropy(
        logits, labels, lambda t: t - 0.3, 2.0, non_target_logit_fn=lambda t: t
    )
    torch.testing.assert_close(base, same)
    doubled = margin_softmax_cross_entropy(
        logits, labels, lambda t: 2 * (t - 0.3), 1.0, non_target_logit_fn=lambda t: 2 * t
    )
    torch.testing.assert_close(doubled, base)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 3}, {"chunk_size": "auto"}])
def test_bounded_mode_matches_formula(kwargs) -> None:
    """The non-target function runs on the fused core, in bounded mode too."""
    x, y, loss = _setup(b=10, classes=7, seed=3, **kwargs)
    got = loss(x, y)
    want = ref_losses(x, loss.W, y, 0.25, 32.0).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(
        torch.autograd.grad(got, (x, loss.W)), torch.autograd.grad(want, (x, loss.W)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_partial_fc_grad_only_on_sampled_columns() -> None:
    x, y, loss = _setup(b=6, classes=20, seed=4, sample_rate=0.5)
    torch.manual_seed(0)
    loss(x, y).backward()
    touched = (loss.W.grad != 0).any(0)
    assert touched[y].all() and int(touched.sum()) == 10
