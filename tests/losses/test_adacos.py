"""AdaCos: the fixed scale, the dynamic update against the paper's formulas, the buffer."""

from __future__ import annotations

import math

import pytest
import torch

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.losses import AdaCosLoss, NormSoftmaxLoss
from pml_margins.losses.adacos import adacos_fixed_scale
from tests.losses.reference import normalized_cosine

C, D, B = 17, 8, 21


def _paper_dynamic_scale(x, w, y, s_prev: float) -> float:
    """Eqs. 15-16 in float64, written out: B_avg as a plain sum, the median by sorting."""
    cos = normalized_cosine(x.double(), w.double())
    b_avg = 0.0
    for i in range(len(y)):
        for k in range(cos.shape[1]):
            if k != int(y[i]):
                b_avg += math.exp(s_prev * float(cos[i, k]))
    b_avg /= len(y)
    angles = sorted(math.acos(max(-1.0, min(1.0, float(cos[i, y[i]])))) for i in range(len(y)))
    theta_med = angles[(len(angles) - 1) // 2]  # the lower median, torch.median's
    return math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))


@pytest.mark.parametrize("num_classes", [3, 100, 10_575])
def test_fixed_scale_is_sqrt2_log_c_minus_1(num_classes: int) -> None:
    loss = AdaCosLoss(num_classes, 4, dynamic=False)
    assert float(loss.scale) == pytest.approx(math.sqrt(2) * math.log(num_classes - 1), rel=1e-6)


def test_fixed_scale_equals_normalized_softmax_with_that_scale() -> None:
    torch.manual_seed(0)
    ada = AdaCosLoss(C, D, dynamic=False).double()
    nsl = NormSoftmaxLoss(C, D, scale=math.sqrt(2) * math.log(C - 1)).double()
    nsl.load_state_dict(ada.state_dict(), strict=False)
    x, y = torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,))
    torch.testing.assert_close(ada(x, y), nsl(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [B, B + 1], ids=["odd", "even"])
def test_dynamic_scale_follows_the_paper_step_by_step(batch: int) -> None:
    torch.manual_seed(1)
    loss = AdaCosLoss(C, D).double()
    s = math.sqrt(2) * math.log(C - 1)
    for step in range(4):
        x = (torch.randn(batch, D, dtype=torch.float64) + step).requires_grad_(True)
        y = torch.randint(0, C, (batch,))
        s = _paper_dynamic_scale(x.detach(), loss.W.detach(), y, s)
        out = loss(x, y)
        assert float(loss.scale) == pytest.approx(s, rel=1e-10)
        # the step's loss already uses the new scale (Algorithm 1), as a constant
        nsl = NormSoftmaxLoss(C, D, scale=s).double()
        nsl.load_state_dict(loss.state_dict(), strict=False)
        xr = x.detach().clone().requires_grad_(True)
        ref = nsl(xr, y)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        g = torch.autograd.grad(out, x)[0]
        torch.testing.assert_close(g, torch.autograd.grad(ref, xr)[0], rtol=1e-8, atol=1e-12)


def test_dynamic_scale_with_small_target_angles() -> None:
    """theta_med below pi/4: the cosine of the median angle itself, not of pi/4."""
    torch.manual_seed(3)
    loss = AdaCosLoss(C, D).double()
    y = torch.randint(0, C, (B,))
    x = loss.W.detach().t()[y] + 0.1 * torch.randn(B, D, dtype=torch.float64)
    cos = normalized_cosine(x, loss.W.detach())[torch.arange(B), y]
    assert torch.acos(cos).median() < math.pi / 4
    s = _paper_dynamic_scale(x, loss.W.detach(), y, float(loss.scale))
    loss(x, y)
    assert float(loss.scale) == pytest.approx(s, rel=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_dynamic_scale_that_would_not_be_positive_keeps_the_current_one(chunk_size) -> None:
    """B_avg <= 1 (every non-target logit below 0): the paper's s' = log B_avg / cos(.) is
    <= 0, which inverts the softmax; the scale stays, and updates resume afterwards."""
    loss = AdaCosLoss(3, 2, chunk_size=chunk_size).double()
    with torch.no_grad():
        loss.W.copy_(torch.tensor([[1.0, -1.0, -1.0], [0.0, 0.01, -0.01]]))
    x, y = torch.tensor([[1.0, 0.0]]).repeat(4, 1).double(), torch.zeros(4, dtype=torch.long)
    s = float(loss.scale)
    assert _paper_dynamic_scale(x, loss.W.detach(), y, s) < 0  # what the formula says
    for _ in range(3):
        out = loss(x, y)
        assert float(loss.scale) == s
        assert float(out) < math.log(3)  # the right class is rewarded, not penalized
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5], [0.5, 0.5]], dtype=torch.float64)
    s2 = _paper_dynamic_scale(x2, loss.W.detach(), y, s)
    assert s2 > 0
    loss(x2, y)
    assert float(loss.scale) == pytest.approx(s2, rel=1e-10)


def test_a_kept_scale_stays_exactly_the_float64_buffer_of_a_float32_loss() -> None:
    """(found by review) the kept scale went through float32: 0.98025814 -> 0.98025817."""
    loss = AdaCosLoss(3, 2)
    assert loss.scale.dtype == torch.float64 and loss.W.dtype == torch.float32
    with torch.no_grad():
        loss.W.copy_(torch.tensor([[1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
    before = loss.scale.clone()
    loss(torch.tensor([[1.0, 0.0]]).repeat(4, 1), torch.zeros(4, dtype=torch.long))
    assert torch.equal(loss.scale, before)


def test_public_dynamic_scale_keeps_a_given_scale_when_the_formula_is_not_positive() -> None:
    from pml_margins.losses.adacos import adacos_dynamic_scale

    cosine = torch.tensor([[1.0, -0.9, -0.8], [0.9, -1.0, -0.7]])
    labels = torch.tensor([0, 0])
    out = adacos_dynamic_scale(cosine, labels, 2.0)
    assert out.dtype == torch.float32 and out.ndim == 0 and float(out) == 2.0
    out = adacos_dynamic_scale(cosine.double(), labels, torch.tensor(3.0, dtype=torch.float64))
    assert out.dtype == torch.float64 and float(out) == 3.0


@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        (math.nan, ValueError, "finite"),
        (torch.tensor(math.nan), ValueError, "NaN or Inf"),
        (-3.0, ValueError, "> 0"),
        (torch.tensor(-1.0), ValueError, r"\(0, 1e\+15\]"),
        (math.inf, ValueError, "finite"),
        (True, TypeError, "real number"),
        (torch.tensor([2.0, 3.0]), ValueError, "one real value"),
    ],
)
def test_public_dynamic_scale_refuses_a_bad_current_scale(scale, error, message) -> None:
    """As the loss refuses it (NaN gave a NaN scale, -3 a scale of inverted logits)."""
    from pml_margins.losses.adacos import adacos_dynamic_scale

    cosine = torch.tensor([[1.0, -0.9, -0.8], [0.9, -1.0, -0.7]])
    with pytest.raises(error, match=message):
        adacos_dynamic_scale(cosine, torch.tensor([0, 0]), scale)


def test_scale_changes_only_in_training_mode() -> None:
    loss = AdaCosLoss(C, D)
    x, y = torch.randn(B, D), torch.randint(0, C, (B,))
    start = loss.scale.clone()
    loss.eval()
    loss(x, y)
    assert torch.equal(loss.scale, start)
    loss.train()
    loss(x, y)
    assert not torch.equal(loss.scale, start)
    fixed = AdaCosLoss(C, D, dynamic=False)
    fixed(x, y)
    assert float(fixed.scale) == pytest.approx(math.sqrt(2) * math.log(C - 1), rel=1e-6)


def test_scale_is_a_buffer_that_round_trips() -> None:
    a = AdaCosLoss(C, D)
    a(torch.randn(B, D), torch.randint(0, C, (B,)))
    assert set(a.state_dict()) == {"W", "scale"}
    b = AdaCosLoss(C, D)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.scale, a.scale) and torch.equal(b.W, a.W)
    x, y = torch.randn(5, D), torch.randint(0, C, (5,))
    a.eval(), b.eval()
    assert torch.equal(a(x, y), b(x, y))
    assert "scale=" in repr(a) and "dynamic=True" in repr(a)


def test_initial_scale_and_fused_modes() -> None:
    """A given scale is the start; chunked and Partial FC give the same step as default."""
    torch.manual_seed(2)
    x, y = torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,))
    base = AdaCosLoss(C, D, scale=5.0).double()
    assert float(base.scale) == 5.0
    chunked = AdaCosLoss(C, D, scale=5.0, chunk_size=4).double()
    chunked.load_state_dict(base.state_dict())
    torch.testing.assert_close(base(x, y), chunked(x, y), rtol=1e-12, atol=1e-12)
    # (bounded mode sums the statistics in its own column blocks: the last bits may differ)
    torch.testing.assert_close(base.scale, chunked.scale, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 7}, {"chunk_size": 7, "sample_rate": 0.5}])
def test_bounded_dynamic_scale_never_forms_a_batch_by_classes_tensor(kwargs) -> None:
    """Bounded mode holds no ``(B, C)`` tensor, the dynamic scale's statistics included
    (they formed the whole cosine matrix and a scaled copy: 597 MiB of peak RSS growth at
    256 x 16 x 300k with ``chunk_size=4096``, against 42 MiB without the dynamic scale),
    with the step's scale of the paper."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(9)
    batch, dim, classes = 48, 4, 1000  # B C = 48k elements, W = 4k
    loss = AdaCosLoss(classes, dim, **kwargs).double()
    x = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    want = _paper_dynamic_scale(x.detach(), loss.W.detach(), y, float(loss.scale))
    with Largest() as seen:
        loss(x, y).backward()
    assert float(loss.scale) == pytest.approx(want, rel=1e-12)
    assert 0 < seen.numel < batch * classes // 4


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_classes": 2}, ValueError, r"num_classes >= 3.*0 for two classes"),
        ({"scale": 0.0}, ValueError, "scale must be > 0"),
        ({"scale": math.nan}, ValueError, "scale must be finite"),
        ({"dynamic": "yes"}, TypeError, "dynamic must be a bool"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message: str) -> None:
    args = {"num_classes": C, "embedding_size": D, **kwargs}
    with pytest.raises(error, match=message):
        AdaCosLoss(**args)


def test_fixed_scale_takes_any_integer_and_names_a_bad_type() -> None:
    """The public function takes what the loss takes (numpy/tensor integers: it refused
    them as "needs num_classes >= 3"), and a float is a TypeError, not a range error."""
    import numpy as np

    expected = math.sqrt(2) * math.log(9)
    for count in (10, np.int64(10), np.int32(10), torch.tensor(10)):
        assert adacos_fixed_scale(count) == pytest.approx(expected, rel=1e-15)
    for bad in (10.0, "10", True):
        with pytest.raises(TypeError, match="num_classes"):
            adacos_fixed_scale(bad)
    for small in (2, np.int64(2), 0):
        with pytest.raises(ValueError, match="num_classes"):
            adacos_fixed_scale(small)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "fixed"])
def test_sharded_in_one_process_equals_the_loss(dynamic: bool) -> None:
    """The dynamic scale through prepare_step's statistics: the same scale and loss."""
    sharded = ShardedMarginSoftmaxLoss(AdaCosLoss, C, D, dynamic=dynamic).double()
    ref = AdaCosLoss(C, D, dynamic=dynamic).double()
    sharded.loss.load_state_dict(ref.state_dict())
    for _ in range(2):
        x, y = torch.randn(B, D, dtype=torch.float64), torch.randint(0, C, (B,))
        torch.testing.assert_close(sharded(x, y), ref(x, y), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sharded.loss.scale, ref.scale, rtol=1e-12, atol=0)
    assert (float(ref.scale) != math.sqrt(2) * math.log(C - 1)) == dynamic


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_every_shard_starts_from_the_scale_of_all_classes(world_size: int) -> None:
    """scale=None is sqrt(2) log(C - 1) of all C classes on every rank, even on a rank
    with fewer than 3 classes of its own (5 classes on 3 or 5 ranks)."""
    for num_classes in (5, 11):
        for rank in range(world_size):
            shard = ShardedMarginSoftmaxLoss(
                AdaCosLoss, num_classes, D, rank=rank, world_size=world_size
            )
            assert float(shard.loss.scale) == math.sqrt(2) * math.log(num_classes - 1)
            given = ShardedMarginSoftmaxLoss(
                AdaCosLoss, num_classes, D, rank=rank, world_size=world_size, scale=7.0
            )
            assert float(given.loss.scale) == 7.0


def _three_steps(loss: AdaCosLoss, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [loss(x, y).detach() for _ in range(3)]


def test_a_path_other_than_the_core_gets_the_steps_scale() -> None:
    """The update is deferred to the core when the core will run; a step whose loss then
    went another way (a subclass's own path; a compiled forward, where the logits' methods
    looked redefined) used the scale before the update, and the update came after."""

    class PlainLosses(AdaCosLoss):
        def _per_sample_losses(self, embeddings, labels, statistics=None):
            fn = self.non_target_logit_fn()
            return self._losses_of(embeddings, labels, fn, None, statistics)

    torch.manual_seed(0)
    x, y = 3 * torch.randn(B, D), torch.randint(0, C, (B,))
    eager, plain = AdaCosLoss(C, D), PlainLosses(C, D)
    plain.load_state_dict(eager.state_dict())
    expected = _three_steps(eager, x, y)
    torch.testing.assert_close(_three_steps(plain, x, y), expected)
    torch.testing.assert_close(plain.scale, eager.scale)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", [{}, {"chunk_size": 4}], ids=["default", "blocked"])
def test_a_compiled_dynamic_adacos_equals_eager(backend: str, mode: dict) -> None:
    """Under torch.compile the loss took the plain path after deferring its update: each
    step's loss was the previous step's (2.6186 for 2.8227). With aot_eager (and
    inductor) the write into the 0-dim float64 scale was dropped: the scale never moved
    (2.2761 for 2.8710; found by review)."""
    torch.manual_seed(0)
    x, y = 3 * torch.randn(B, D), torch.randint(0, C, (B,))
    eager = AdaCosLoss(C, D, **mode)
    module = AdaCosLoss(C, D, **mode)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, backend=backend)
    expected = _three_steps(eager, x, y)
    torch.testing.assert_close(_three_steps(compiled, x, y), expected)
    torch.testing.assert_close(module.scale, eager.scale)
