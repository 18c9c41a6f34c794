"""Running statistics stay float32 in a half-precision loss, so their moving averages move."""

from __future__ import annotations

import pytest
import torch

from pml_margins.losses import AdaCosLoss, AdaFaceLoss, CenterLoss, CosFaceLoss, CurricularFaceLoss

C, D, B = 20, 16, 64
LOSSES = [
    (AdaFaceLoss, ("batch_mean", "batch_std")),
    (CurricularFaceLoss, ("t",)),
    (AdaCosLoss, ("scale",)),
]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("loss_type", "names"), LOSSES, ids=[c.__name__ for c, _ in LOSSES])
def test_half_precision_loss_keeps_float32_statistics_that_track(loss_type, names, half) -> None:
    """300 training steps: a bf16/fp16 loss's statistics follow the float32 loss's (a
    half-precision moving average stalled: AdaFace's batch_mean ended 5.56 vs 4.81)."""
    torch.manual_seed(0)
    wide = loss_type(C, D)
    y = torch.randint(0, C, (B,))
    # near their class weights: target cosines ~0.7, so CurricularFace's t climbs
    x = 3 * torch.nn.functional.normalize(wide.W.detach().t()[y], dim=1) + torch.randn(B, D)
    narrow = loss_type(C, D)
    narrow.load_state_dict(wide.state_dict())
    narrow = narrow.to(half)
    assert narrow.W.dtype == half
    assert all(getattr(narrow, n).dtype == torch.float32 for n in names)
    with torch.no_grad():
        wide.W.copy_(narrow.W.float())
    for _ in range(300):
        wide(x, y)
        narrow(x.to(half), y)
    for name in names:
        got, want = getattr(narrow, name), getattr(wide, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(("loss_type", "names"), LOSSES, ids=[c.__name__ for c, _ in LOSSES])
def test_other_casts_and_the_state_dict_are_unchanged(loss_type, names) -> None:
    """float64 stays float64; a cast half loss's state dict loads into another exactly."""
    loss = loss_type(C, D).double()
    assert all(getattr(loss, n).dtype == torch.float64 for n in names)
    half = loss_type(C, D).half()
    half(torch.randn(B, D).half(), torch.randint(0, C, (B,)))
    other = loss_type(C, D).half()
    other.load_state_dict(half.state_dict())
    for key, value in half.state_dict().items():
        assert other.state_dict()[key].dtype == value.dtype
        assert torch.equal(other.state_dict()[key], value), key


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.5, 0.05])
def test_half_precision_center_loss_keeps_float32_centres_that_converge(half, alpha) -> None:
    """The paper's update in a bf16/fp16 loss reaches the batch's mean (10.0, exact in
    both) as in float64; with a half-precision buffer it stalled at 9.25 (bf16, 0.05)."""
    loss = CenterLoss(2, 8, alpha=alpha).to(half)
    assert loss.centers.dtype == torch.float32
    x, y = torch.full((4, 8), 10.0, dtype=half), torch.zeros(4, dtype=torch.long)
    centre = 0.0
    for _ in range(2000):
        loss(x, y)
        centre -= alpha * 4 * (centre - 10.0) / 5  # the paper's rule in float64
    assert loss.centers[0].tolist() == pytest.approx([centre] * 8, abs=1e-4)  # float32: ~1e-5
    assert CenterLoss(2, 8, update="sgd").to(half).centers.dtype == half  # a parameter: cast


def _unfit_state_dicts(loss):
    """(what is wrong, a state dict torch refuses, the error) for ``loss``'s state dict."""
    good = {k: v.clone() + 1 for k, v in loss.state_dict().items()}
    name = "W" if "W" in good else "centers"
    wide = {**good, name: torch.randn(good[name].shape[0], good[name].shape[1] + 1)}
    yield "size", wide, f"size mismatch for {name}"
    yield "missing", {k: v for k, v in good.items() if k != name}, "Missing key"
    yield "unexpected", {**good, "extra": torch.zeros(1)}, "Unexpected key"
    yield "not a tensor", {**good, name: [[0.0]]}, "expected torch.Tensor"


@pytest.mark.parametrize(
    "make",
    [
        lambda: CurricularFaceLoss(5, 4),
        lambda: AdaFaceLoss(5, 4),
        lambda: AdaCosLoss(5, 4),
        lambda: CenterLoss(5, 4),
        lambda: CosFaceLoss(5, 4),
    ],
    ids=["curricular", "adaface", "adacos", "center", "cosface"],
)
def test_a_state_dict_that_does_not_fit_changes_nothing(make) -> None:
    """torch copies the entries that fit before raising for the others: a failed load kept
    the checkpoint's statistics (t 0 -> 0.75, AdaCos's scale 3.1 -> 7) or W."""
    loss = make()
    for what, state, message in _unfit_state_dicts(loss):
        before = {k: v.clone() for k, v in loss.state_dict().items()}
        objects = dict(loss.named_parameters())
        for assign in (False, True):
            with pytest.raises(RuntimeError, match=message):
                loss.load_state_dict(state, assign=assign)
            after = loss.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), (what, assign)
            assert all(objects[k] is p for k, p in loss.named_parameters()), (what, assign)
    name = "W" if "W" in loss.state_dict() else "centers"
    partial = {k: v + 1 for k, v in loss.state_dict().items() if k != name}
    result = loss.load_state_dict(partial, strict=False)  # fits without W: loads the rest
    assert result.missing_keys == [name]
    assert all(torch.equal(loss.state_dict()[k], v) for k, v in partial.items())


def test_a_failed_load_is_undone_whatever_fails_and_copies_nothing_it_need_not() -> None:
    """Failures the shape check does not foresee (a meta or sparse entry, an integer W
    assigned) left t at 0.75; a loss whose hooks cannot be deep-copied (a lock) raised
    TypeError instead of torch's error; a key-renaming pre-hook made a load that succeeds
    run twice, on a copy of W first."""
    import threading

    loss = CurricularFaceLoss(5, 4)
    good = {k: v.clone() for k, v in loss.state_dict().items()}
    for name, value, assign in (
        ("t", torch.empty((), device="meta"), False),
        ("W", good["W"].to_sparse(), False),
        ("W", good["W"].long(), True),
    ):
        state = {**good, "t": torch.tensor(0.75), name: value}
        with pytest.raises(RuntimeError):
            loss.load_state_dict(state, assign=assign)
        assert float(loss.t) == 0.0 and torch.equal(loss.W, good["W"]), name

    class Logger:
        def __init__(self) -> None:
            self.lock = threading.Lock()  # (a deepcopy of the loss fails on it)
            self.seen: list[torch.nn.Module] = []

        def after_load(self, module, keys):
            self.seen.append(module)

    logger = Logger()
    loss.register_load_state_dict_post_hook(logger.after_load)
    with pytest.raises(RuntimeError, match="size mismatch for W"):
        loss.load_state_dict({**good, "W": torch.randn(4, 6)})
    assert logger.seen and all(m is loss for m in logger.seen)
    renamed = []

    def upgrade(module, state_dict, prefix, *args):
        renamed.append(1)
        state_dict[prefix + "W"] = state_dict.pop(prefix + "weight")

    loss.register_load_state_dict_pre_hook(upgrade)
    old = {("weight" if k == "W" else k): v + 1 for k, v in good.items()}
    loss.load_state_dict(old)
    assert renamed == [1] and torch.equal(loss.W, good["W"] + 1)


def test_a_failed_load_is_undone_when_user_hooks_or_odd_entries_fail_it() -> None:
    """A load that passes torch's checks but fails in a user's post-hook (or one that adds
    a missing key), an inference-mode W assigned, a quantized W: t stayed at 0.75."""
    loss = CurricularFaceLoss(5, 4)
    good = {k: v.clone() for k, v in loss.state_dict().items()}
    with torch.inference_mode():
        inference_w = good["W"] + 0
    cases = [
        ({"W": inference_w}, True, None),
        ({"W": torch.quantize_per_tensor(good["W"], 0.1, 0, torch.qint8)}, False, None),
    ]

    def raising(module, keys):
        raise RuntimeError("check failed")

    def missing(module, keys):
        keys.missing_keys.append("W_ema")

    cases += [({}, False, raising), ({}, False, missing)]
    for entries, assign, hook in cases:
        handle = None if hook is None else loss.register_load_state_dict_post_hook(hook)
        with pytest.raises(RuntimeError):
            loss.load_state_dict({**good, "t": torch.tensor(0.75), **entries}, assign=assign)
        assert float(loss.t) == 0.0 and torch.equal(loss.W, good["W"]), (entries, hook)
        if handle is not None:
            handle.remove()


def test_a_failed_load_puts_back_live_extra_state() -> None:
    """Extra state kept by reference came back as the failed load left it."""

    class Counted(CosFaceLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = torch.zeros((), dtype=torch.long)

        def get_extra_state(self):
            return {"steps": self.steps}

        def set_extra_state(self, state):
            self.steps.copy_(state["steps"])

    loss = Counted(5, 4)
    state = loss.state_dict()
    state = {**state, "_extra_state": {"steps": torch.tensor(7)}, "W": torch.randn(4, 6)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        loss.load_state_dict(state)
    assert int(loss.steps) == 0


def test_a_failed_load_is_undone_when_the_modules_own_load_code_fails_it() -> None:
    """set_extra_state refusing, or a _load_from_state_dict override checking after torch's
    copy, raised with W already overwritten; an inference-tensor t failed its copy with W
    changed; extra state that cannot be deep-copied made a renaming load fail."""
    import threading

    class Checked(CurricularFaceLoss):
        def _load_from_state_dict(self, state_dict, prefix, *args):
            super()._load_from_state_dict(state_dict, prefix, *args)
            if not bool(torch.isfinite(self.W).all()):
                raise ValueError("W must be finite")

    class WithExtra(CurricularFaceLoss):
        lock = threading.Lock()

        def get_extra_state(self):
            return {"lock": self.lock}

        def set_extra_state(self, state):
            if not isinstance(state, dict):
                raise ValueError("bad extra state")

    loss = Checked(5, 4)
    good = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises(ValueError, match="finite"):
        loss.load_state_dict({**good, "W": torch.full_like(good["W"], float("nan"))})
    assert torch.equal(loss.W, good["W"])
    loss = WithExtra(5, 4)
    good = {k: v for k, v in loss.state_dict().items()}
    new_w = torch.randn_like(good["W"])
    with pytest.raises(ValueError, match="bad extra state"):
        loss.load_state_dict({**good, "W": new_w, "_extra_state": 3})
    assert not torch.equal(loss.W, new_w)
    loss.register_load_state_dict_pre_hook(lambda *args: None)
    loss.load_state_dict({**good, "W": new_w})  # (snapshot path: the lock is kept as is)
    assert torch.equal(loss.W, new_w)
    loss = CurricularFaceLoss(5, 4)
    with torch.inference_mode():
        loss.load_state_dict({**loss.state_dict(), "t": torch.tensor(0.5)}, assign=True)
    before = loss.W.detach().clone()
    with pytest.raises(RuntimeError):
        loss.load_state_dict({"W": torch.randn(4, 5), "t": torch.tensor(0.25)})
    assert torch.equal(loss.W, before) and float(loss.t) == 0.5


def test_a_load_that_copy_cannot_take_is_undone_and_keeps_torchs_error() -> None:
    """A complex W (copy_ warns, an error under -W error) or a bits8 bias fit the shape
    checks: no snapshot, and t / W kept the failed load's values. A subclass with only a
    get_extra_state (torch's set_extra_state raises) had the restore's error replace
    torch's."""
    import warnings

    from pml_margins.losses import SoftmaxLoss

    loss = CurricularFaceLoss(5, 4)
    good = {k: v.clone() for k, v in loss.state_dict().items()}
    state = {"W": good["W"].to(torch.complex64), "t": torch.tensor(0.75)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            loss.load_state_dict(state)
    assert float(loss.t) == 0.0 and torch.equal(loss.W, good["W"])
    softmax = SoftmaxLoss(3, 4)
    before = softmax.W.detach().clone()
    bits = torch.zeros(3, dtype=torch.uint8).view(torch.bits8)
    with pytest.raises(RuntimeError):
        softmax.load_state_dict({"W": torch.ones(4, 3), "bias": bits})
    assert torch.equal(softmax.W, before)

    class Tagged(CosFaceLoss):
        def get_extra_state(self):
            return "v1"

    tagged = Tagged(5, 4)
    with pytest.raises(RuntimeError, match="size mismatch for W") as raised:
        tagged.load_state_dict({"W": torch.randn(4, 6)}, strict=False)
    assert "set_extra_state" not in str(raised.value)


@pytest.mark.parametrize(("loss_type", "names"), LOSSES, ids=[c.__name__ for c, _ in LOSSES])
def test_repr_shows_statistics_and_works_on_the_meta_device(loss_type, names) -> None:
    """A loss built on the meta device prints (found by review: its ``extra_repr`` read the
    statistics with ``float()``, and printing a model holding it raised ``Tensor.item()
    cannot be called on meta tensors``); on a real device each statistic's value shows."""
    loss = loss_type(C, D)
    for name in names:
        assert f"{name}={float(getattr(loss, name)):.4g}" in repr(loss)
    with torch.device("meta"):
        model = torch.nn.Sequential(loss_type(C, D))
    text = repr(model)
    for name in names:
        assert f"{name}=meta" in text
    assert all(f"{name}=meta" in repr(loss.to("meta")) for name in names)
