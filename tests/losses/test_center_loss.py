"""CenterLoss: formula (float64, written here), the paper's center update, PML plumbing."""

from __future__ import annotations

import shutil

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.losses import MultipleLosses
from pytorch_metric_learning.miners import BatchHardMiner, MultiSimilarityMiner
from pytorch_metric_learning.reducers import SumReducer
from pytorch_metric_learning.regularizers import LpRegularizer

from pml_margins.functional import center_distances, center_ema_update
from pml_margins.losses import CenterLoss, SoftmaxLoss

F64 = torch.float64


def _data(b=10, d=4, classes=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def _loss(classes=3, d=4, update="ema", alpha=0.5, seed=1, **kwargs):
    loss = CenterLoss(classes, d, alpha=alpha, update=update, **kwargs).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loss.centers.copy_(torch.randn(classes, d, generator=g, dtype=F64))
    return loss


def ref_terms(x, centers, y):
    """1/2 ||x_i - c_{y_i}||^2 per sample, by a loop."""
    return torch.stack([0.5 * ((x[i] - centers[y[i]]) ** 2).sum() for i in range(len(y))])


def ref_update(centers, x, y, alpha):
    """Delta c_j = sum_{y_i=j}(c_j - x_i) / (1 + n_j); c_j <- c_j - alpha Delta c_j, by a loop."""
    new = centers.clone()
    for j in range(centers.shape[0]):
        members = [i for i in range(len(y)) if y[i] == j]
        delta = sum((centers[j] - x[i] for i in members), torch.zeros_like(centers[j]))
        new[j] = centers[j] - alpha * delta / (1 + len(members))
    return new


@pytest.mark.parametrize("reducer", ["mean", "sum"])
@pytest.mark.parametrize("update", ["ema", "sgd"])
def test_value_and_gradients_match_formula(reducer, update):
    x, y = _data()
    loss = _loss(update=update, reducer=SumReducer() if reducer == "sum" else None)
    centers = loss.centers.detach().clone().requires_grad_(True)
    expected = ref_terms(x, centers, y)
    expected = expected.sum() if reducer == "sum" else expected.mean()
    value = loss(x, y)
    params = [x] + ([loss.centers] if update == "sgd" else [])
    grads = torch.autograd.grad(value, params)
    ref_grads = torch.autograd.grad(expected, [x, centers] if update == "sgd" else [x])
    torch.testing.assert_close(value, expected)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_sum_reducer_is_the_papers_sum():
    x, y = _data(seed=2)
    loss = _loss(reducer=SumReducer())
    c = loss.centers.clone()
    expected = 0.5 * sum(((x[i] - c[y[i]]) ** 2).sum() for i in range(len(y)))
    torch.testing.assert_close(loss(x, y), expected)


def test_ema_update_hand_computed():
    """Two samples of class 0, one of class 2, none of class 1; alpha = 0.5."""
    loss = CenterLoss(3, 2, alpha=0.5).double()
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[1.0, 1.0], [5.0, 5.0], [0.0, 2.0]], dtype=F64))
    x = torch.tensor([[3.0, 1.0], [1.0, 4.0], [2.0, 2.0]], dtype=F64)
    y = torch.tensor([0, 0, 2])
    loss(x, y)
    # class 0: Delta = ((1,1)-(3,1) + (1,1)-(1,4)) / 3 = (-2, -3)/3 -> c = (1,1) + 0.5*(2,3)/3
    # class 1: absent, unchanged; class 2: Delta = ((0,2)-(2,2))/2 = (-1, 0) -> (0.5, 2)
    expected = torch.tensor([[1 + 1 / 3, 1.5], [5.0, 5.0], [0.5, 2.0]], dtype=F64)
    torch.testing.assert_close(loss.centers, expected)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_ema_update_matches_loop_and_happens_after_the_loss(alpha):
    x, y = _data(b=12, classes=5, seed=3)
    loss = _loss(classes=5, alpha=alpha)
    before = loss.centers.clone()
    value = loss(x, y)
    torch.testing.assert_close(value, ref_terms(x, before, y).mean())  # old centers
    torch.testing.assert_close(loss.centers, ref_update(before, x.detach(), y, alpha))
    torch.testing.assert_close(center_ema_update(before, x, y, alpha), loss.centers)
    assert not loss.centers.requires_grad
    assert loss.centers.grad_fn is None


def test_no_update_in_eval_mode_or_in_sgd_mode():
    x, y = _data(seed=4)
    for loss in (_loss().eval(), _loss(update="sgd")):
        before = loss.centers.detach().clone()
        loss(x, y)
        torch.testing.assert_close(loss.centers.detach(), before)


def test_sgd_centers_are_learned_by_the_optimizer():
    x, y = _data(seed=5)
    loss = _loss(update="sgd")
    assert isinstance(loss.centers, torch.nn.Parameter)
    assert [n for n, _ in loss.named_parameters()] == ["centers"]
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    before = loss.centers.detach().clone()
    loss(x, y).backward()
    opt.step()
    present = torch.unique(y)
    assert not torch.allclose(loss.centers[present], before[present])
    absent = [j for j in range(3) if j not in present.tolist()]
    torch.testing.assert_close(loss.centers.detach()[absent], before[absent])


def test_ema_centers_are_a_buffer_not_a_parameter():
    loss = CenterLoss(3, 4)
    assert list(loss.parameters()) == []
    assert "centers" in dict(loss.named_buffers())


@pytest.mark.parametrize("update", ["ema", "sgd"])
def test_state_dict_round_trip(update):
    x, y = _data(seed=6)
    loss = _loss(update=update)
    loss(x, y)
    state = loss.state_dict()
    assert set(state) == {"centers"}
    fresh = CenterLoss(3, 4, update=update).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.centers, loss.centers)
    other = CenterLoss(3, 4, update="sgd" if update == "ema" else "ema").double()
    other.load_state_dict(state)  # the key is the same in both modes
    torch.testing.assert_close(other.centers.detach(), loss.centers.detach())


@pytest.mark.parametrize("miner", [BatchHardMiner, MultiSimilarityMiner])
def test_miner_weights_honoured(miner):
    x, y = _data(b=12, classes=3, seed=7)
    it = miner()(x, y)
    loss = _loss()
    terms = ref_terms(x, loss.centers.clone(), y)
    counts = torch.zeros(12, dtype=F64)
    for t in it:
        counts += torch.bincount(t, minlength=12).to(F64)
    weights = counts / counts.max()
    torch.testing.assert_close(loss(x, y, it), (terms * weights).mean())


def test_embedding_regularizer_honoured():
    x, y = _data(seed=8)
    loss = _loss(embedding_regularizer=LpRegularizer())
    plain = _loss()
    torch.testing.assert_close(loss(x, y), plain(x, y) + x.norm(dim=1).mean())


def test_joint_supervision_with_pml_multiple_losses():
    """Softmax + lambda * center through PML's MultipleLosses, the documented path."""
    x, y = _data(b=16, d=4, classes=3, seed=9)
    lam = 0.1
    softmax = SoftmaxLoss(3, 4).double()
    center = _loss()
    joint = MultipleLosses([softmax, center], weights=[1.0, lam])
    before = center.centers.clone()
    expected = softmax(x, y) + lam * ref_terms(x, before, y).mean()
    value = joint(x, y)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(center.centers, ref_update(before, x.detach(), y, 0.5))
    joint.eval()
    after = center.centers.clone()
    joint(x, y)
    torch.testing.assert_close(center.centers, after)


def test_gradcheck_tiny():
    x, y = _data(b=4, d=3, classes=2, seed=10)
    loss = CenterLoss(2, 3, update="sgd").double()
    assert torch.autograd.gradcheck(lambda e, c: center_distances(e, c, y), (x, loss.centers))
    loss.eval()
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,))


@pytest.mark.parametrize("update", ["ema", "sgd"])
def test_autocast_bf16(update):
    x, y = _data(b=8, d=4, seed=11, dtype=torch.float32)
    loss = CenterLoss(3, 4, update=update)
    lin = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(lin(x), y)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert loss.centers.dtype == torch.float32
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((torch.randn(3, 4), torch.tensor([0, 1, 3])), ValueError, r"\[0, 3\)"),
        ((torch.randn(3, 4), torch.tensor([0, -1, 2])), ValueError, r"\[0, 3\)"),
        ((torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer dtype"),
        ((torch.randn(3, 5), torch.tensor([0, 1, 2])), ValueError, "width 5"),
        ((torch.randn(3, 4), torch.tensor([0, 1])), ValueError, "length 2"),
        ((torch.randn(0, 4), torch.tensor([], dtype=torch.long)), ValueError, "empty"),
        ((torch.full((3, 4), float("inf")), torch.tensor([0, 1, 2])), ValueError, "NaN or Inf"),
        ((torch.randn(3, 4),), ValueError, "requires labels"),
        (
            (torch.randn(3, 4), torch.tensor([0, 1, 2]), None, torch.randn(3, 4)),
            ValueError,
            "ref_emb",
        ),
        (
            (torch.randn(3, 4), torch.tensor([0, 1, 2]), (torch.tensor([0]),) * 2),
            ValueError,
            "3 elements",
        ),
        (
            (torch.randn(3, 4), torch.tensor([0, 1, 2]), (torch.tensor([7]),) * 3),
            ValueError,
            "must lie in",
        ),
    ],
)
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        CenterLoss(3, 4)(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"alpha": 0}, ValueError, r"alpha must lie in \(0.0, 1.0\]"),
        ({"alpha": 1.5}, ValueError, "alpha must lie"),
        ({"alpha": True}, TypeError, "real number"),
        ({"update": "adam"}, ValueError, "update must be one of"),
        ({"update": None}, TypeError, "update must be a str"),
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1"),
        ({"embedding_size": 2.0}, TypeError, "embedding_size must be an int"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, match):
    args = {"num_classes": 3, "embedding_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        CenterLoss(**args)


def test_extra_repr():
    assert "num_classes=3, embedding_size=4, update='ema', alpha=0.5" in repr(CenterLoss(3, 4))
    assert "update='sgd'" in repr(CenterLoss(3, 4, update="sgd"))
    assert "alpha" not in repr(CenterLoss(3, 4, update="sgd"))


@pytest.mark.parametrize(
    "distance",
    [
        LpDistance(),  # PML's default normalizes: not the definition's distance
        LpDistance(p=1, power=2, normalize_embeddings=False),
        LpDistance(p=2, power=1, normalize_embeddings=False),
        CosineSimilarity(),
        DotProductSimilarity(),
    ],
)
def test_a_distance_other_than_the_definitions_is_refused(distance):
    with pytest.raises(TypeError, match=r"may only be LpDistance\(p=2, power=2, normalize"):
        CenterLoss(3, 4, distance=distance)


def test_the_definitions_distance_is_the_default_and_accepted():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    default = CenterLoss(3, 4)
    given = CenterLoss(3, 4, distance=LpDistance(p=2, power=2, normalize_embeddings=False))
    d = default.distance
    assert (type(d), d.p, d.power, d.normalize_embeddings) == (LpDistance, 2, 2, False)
    assert torch.equal(default(x, y), given(x, y))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("clang++") is None,
    reason="inductor compiles C++ on the CPU: no C++ compiler here",
)
def test_compiled_ema_center_loss_trains_as_eager_under_inductor() -> None:
    """torch.compile (inductor): its backward recomputed x - c_y from the centre buffer,
    which the ema update writes in place before backward(): every step failed with
    "modified by an inplace operation" (found by review). The batch's rows are now gathered
    outside the graph: losses, gradients and centres equal eager over three steps."""
    torch.manual_seed(0)
    eager = CenterLoss(20, 16)
    compiled_loss = CenterLoss(20, 16)
    compiled_loss.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_loss)  # the default backend, inductor
    for _ in range(3):
        x = torch.randn(8, 16)
        y = torch.randint(0, 20, (8,))
        got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got, want = compiled(got_x, y), eager(want_x, y)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_x.grad, want_x.grad)
        torch.testing.assert_close(compiled_loss.centers, eager.centers)


@pytest.mark.parametrize("update", ["sgd", "ema"])
def test_non_finite_centers_are_named_not_the_embeddings(update):
    """Centres made NaN (a diverged step on ``update="sgd"``, an edit in place) give
    non-finite losses from small embeddings: the error names the centres instead of
    telling the user to scale the embeddings down."""
    torch.manual_seed(0)
    loss = CenterLoss(4, 3, update=update)
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with torch.no_grad():
        loss.centers[2, 1] = float("nan")
    with pytest.raises(ValueError, match="centers hold NaN/Inf") as info:
        loss(x, y)
    assert "scale the embeddings down" not in str(info.value)
    with torch.no_grad():
        loss.centers[2, 1] = 0.0
    big = torch.full((8, 3), 3e19)  # finite centres: the squares overflow, as before
    with pytest.raises(ValueError, match="scale the embeddings down"):
        loss(big, y)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_centers_outside_the_batch_are_named_by_the_update(value):
    """A NaN/Inf centre of a class the batch does not hold: the losses are finite, and
    the EMA update's check named float32's range and the embeddings; it names the
    centres, and the update leaves them as they were."""
    torch.manual_seed(0)
    loss = CenterLoss(5, 3)
    with torch.no_grad():
        loss.centers[4, 0] = value
    before = loss.centers.clone()
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="centers hold NaN/Inf") as info:
        loss(x, y)
    assert "range" not in str(info.value) and "scale the embeddings" not in str(info.value)
    torch.testing.assert_close(loss.centers, before, equal_nan=True)
    with torch.no_grad():  # finite centres: the update runs
        loss.centers[4, 0] = 0.0
    assert torch.isfinite(loss(x, y))
