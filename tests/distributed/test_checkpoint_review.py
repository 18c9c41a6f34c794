"""Sharded checkpoints that do not fit together are refused, naming why; nothing else a
resume needs is lost silently (found by review: merged shards of two runs, rank 0's
state dict on every rank, a numpy hyper-parameter, unreadable files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.distributed.checkpoint import (
    from_single_process_loss,
    load_into,
    load_shard,
    merge_shards,
    save_shard,
    shard_checkpoint,
    split_checkpoint,
    to_single_process_loss,
)
from pml_margins.losses import (
    AdaCosLoss,
    ArcFaceLoss,
    CurricularFaceLoss,
    SoftmaxLoss,
    SubCenterArcFaceLoss,
)


def _shards(loss, world_size=2, **kwargs):
    return split_checkpoint(from_single_process_loss(loss, **kwargs), world_size)


def test_shards_of_different_runs_are_refused():
    torch.manual_seed(0)
    a = _shards(ArcFaceLoss(10, 4, margin=0.5))
    b = _shards(ArcFaceLoss(10, 4, margin=0.2))
    with pytest.raises(ValueError, match=r"shards disagree on loss_kwargs .*not one run"):
        merge_shards([a[0], b[1]])
    t0, t1 = CurricularFaceLoss(10, 4), CurricularFaceLoss(10, 4)
    t1.t.fill_(0.7)  # a stale shard: another step's running statistic
    with pytest.raises(ValueError, match=r"disagree on t, which every rank holds whole"):
        merge_shards([_shards(t0)[0], _shards(t1)[1]])
    k3, k2 = (
        _shards(SubCenterArcFaceLoss(10, 4, sub_centers=3)),
        _shards(SubCenterArcFaceLoss(10, 4, sub_centers=2)),
    )
    k2[1]["loss_kwargs"] = k3[1]["loss_kwargs"]  # only the W widths tell them apart
    with pytest.raises(ValueError, match=r"shard 1's W has 10 entries .* 3 per class"):
        merge_shards([k3[0], k2[1]])
    half = _shards(ArcFaceLoss(10, 4).half())
    with pytest.raises(ValueError, match=r"dtype of W: torch.float32 \(shard 0\), torch.float16"):
        merge_shards([a[0], half[1]])


def test_shards_whose_class_ranges_are_not_the_contiguous_split_are_refused():
    """Two ranks that both claim to hold classes [0, 5) (or ranges swapped) are not one
    run's shards, even where every other field agrees (found by review: no test gave
    such shards, and removing the check passed)."""
    torch.manual_seed(0)
    shards = _shards(ArcFaceLoss(10, 4))
    for ranges in ([(0, 5), (0, 5)], [(5, 10), (0, 5)], [(0, 4), (4, 10)]):
        edited = [dict(shard, class_range=list(r)) for shard, r in zip(shards, ranges, strict=True)]
        with pytest.raises(ValueError, match="shard class ranges do not match the contiguous"):
            merge_shards(edited)
    merge_shards(shards)  # (the split's own ranges load)


def test_a_w_that_does_not_fit_num_classes_is_refused():
    full = from_single_process_loss(ArcFaceLoss(10, 4))
    full["state_dict"]["W"] = torch.zeros(4, 25)
    with pytest.raises(ValueError, match=r"25 entries .* not a multiple of num_classes=10"):
        split_checkpoint(full, 2)


def test_another_ranks_state_dict_is_refused_before_anything_loads():
    """``torch.save(loss.state_dict())`` on rank 0, loaded on every rank: rank 1 got rank
    0's classes with all keys matching."""
    rank0 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2)
    rank1 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=1, world_size=2)
    before = rank1.W_local.detach().clone()
    with pytest.raises(ValueError, match=r"shard .*\[0, 5\].* this rank's loss .*\[5, 10\]"):
        rank1.load_state_dict(rank0.state_dict())
    assert torch.equal(rank1.W_local, before)
    rank1.load_state_dict(rank1.state_dict())  # its own loads
    old_format = {k: v for k, v in rank1.state_dict().items() if k != "_extra_state"}
    rank1.load_state_dict(old_format)  # saved before the extra state existed


def test_numpy_hyperparameters_are_saved_as_python_numbers(tmp_path):
    loss = ShardedMarginSoftmaxLoss(
        AdaCosLoss, 10, 4, rank=0, world_size=1, scale=np.float64(10.0), dynamic=np.bool_(False)
    )
    save_shard(loss, tmp_path / "s.pt")
    saved = load_shard(tmp_path / "s.pt")["loss_kwargs"]  # weights_only: it failed before
    assert saved["scale"] == 10.0 and type(saved["scale"]) is float
    assert saved["dynamic"] is False
    full = from_single_process_loss(SoftmaxLoss(10, 4, bias=False), bias=np.bool_(False))
    assert full["loss_kwargs"]["bias"] is False  # it was dropped, then the rebuild failed
    to_single_process_loss(full)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "cannot be read .*EOFError: empty or truncated"),
        (b"hello", r"cannot be read .*not written by torch.save: it starts with b'hell'"),
        (b"\x80\x04junk", r"cannot be read .*\(struct.error: unpack requires"),  # a broken pickle
        (None, "cannot be read"),
    ],
)
def test_an_unreadable_shard_file_is_named(tmp_path, content, match):
    path = tmp_path / "s.pt"
    if content is None:  # an interrupted save
        torch.save(
            shard_checkpoint(ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1)),
            path,
        )
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"'{path}' {match}"):
        load_shard(path)


def test_a_pml_loss_is_refused_with_the_way_round():
    from pytorch_metric_learning.losses import ArcFaceLoss as PMLArcFace

    with pytest.raises(TypeError, match=r"needs a pml_margins ClassWeightLoss.*load the state"):
        from_single_process_loss(PMLArcFace(10, 4))


def test_load_into_restores_the_saved_hyperparameters():
    """A margin a warm-up had moved to 0.3 came back as the constructor's 0.1 (loss 7.74
    where the uninterrupted run gives 8.84); a scheduler restored after agrees."""
    from pml_margins.losses import MagFaceLoss

    moved = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.1)
    moved.loss.margin = 0.3
    resumed = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.1)
    load_into(resumed, shard_checkpoint(moved))
    assert resumed.loss.margin == 0.3
    bounds = ShardedMarginSoftmaxLoss(MagFaceLoss, 10, 4, rank=0, world_size=1)
    bounds.loss.u_m, bounds.loss.l_m = 1.2, 0.9  # above the fresh loss's u_m = 0.8
    fresh = ShardedMarginSoftmaxLoss(MagFaceLoss, 10, 4, rank=0, world_size=1)
    load_into(fresh, shard_checkpoint(bounds))  # l_m = 0.9 > 0.8 first would be refused
    assert (fresh.loss.l_m, fresh.loss.u_m) == (0.9, 1.2)


def test_a_sampler_state_of_another_device_is_named_at_the_first_draw():
    """Loaded as is (a loss loaded on CPU may move to the state's device before it
    samples); at the first draw on another device, a ValueError instead of torch's."""
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, sample_rate=0.5)
    shard = shard_checkpoint(loss)
    shard["sampler_state"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's
    load_into(loss, shard)
    for _ in range(2):  # every step: it went on from the seed after the first error
        with pytest.raises(ValueError, match="does not fit a cpu generator: it was saved on"):
            loss._generator_for(torch.device("cpu"))
    before = loss.W_local.detach().clone()
    bad = {**shard, "sampler_state": "state", "state_dict": {"W": torch.zeros(4, 10)}}
    with pytest.raises(ValueError, match="must be a 1-D uint8 tensor"):
        load_into(loss, bad)
    assert torch.equal(loss.W_local, before)  # a refused shard loads nothing


def test_a_scale_set_back_to_none_is_recorded():
    from pml_margins.losses import SphereFaceLoss

    sharded = ShardedMarginSoftmaxLoss(SphereFaceLoss, 10, 4, rank=0, world_size=1, scale=30.0)
    sharded.loss.scale = None  # the constructor's 30.0 came back
    assert to_single_process_loss(shard_checkpoint(sharded)).scale is None


def test_a_shard_of_another_embedding_size_or_hyperparameter_loads_nothing():
    saved = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4, rank=0, world_size=1)
    saved.loss.t.fill_(0.7)
    shard = shard_checkpoint(saved)
    other = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="embedding_size 4, the loss 8"):
        load_into(other, shard)
    assert float(other.loss.t) == 0.0  # the buffer was loaded before the W error
    same = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4, rank=0, world_size=1)
    bad = {**shard, "loss_kwargs": {**shard["loss_kwargs"], "margin": -1.0}}
    with pytest.raises(ValueError, match="margin"):
        load_into(same, bad)
    assert float(same.loss.t) == 0.0 and same.loss.margin == 0.5


def test_a_shard_of_another_kind_loads_nothing():
    """load_into cast a bool or complex W into a float32 loss (review); another float
    precision (a float32 run resumed in bf16, a float64 shard) is a resume's choice."""
    for dtype in (torch.bool, torch.complex64, torch.int64):
        loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2)
        shard = _shards(ArcFaceLoss(10, 4, margin=0.1))[0]
        shard["state_dict"]["W"] = shard["state_dict"]["W"].to(dtype)
        before = loss.W_local.detach().clone()
        kind = "dense, real tensors" if dtype.is_complex else rf"W {dtype} vs torch.float32"
        with pytest.raises(ValueError, match=kind):  # (complex: refused as a saved state)
            load_into(loss, shard)
        assert torch.equal(loss.W_local, before) and loss.loss.margin != 0.1
    for loss_type in (ArcFaceLoss, AdaCosLoss):
        shard = _shards(loss_type(10, 4))[1]  # float32 W (and AdaCos's float64 scale)
        low = ShardedMarginSoftmaxLoss(loss_type, 10, 4, rank=1, world_size=2).bfloat16()
        load_into(low, shard)
        assert low.W_local.dtype == torch.bfloat16
        assert torch.equal(low.W_local, shard["state_dict"]["W"].bfloat16())


def test_only_softmax_records_a_bias():
    """A user's loss with a use_bias flag got bias=... recorded: its constructor refused it."""

    class WithFlag(ArcFaceLoss):
        use_bias = False

    full = from_single_process_loss(WithFlag(6, 4))
    assert "bias" not in full["loss_kwargs"]


def test_a_meta_loss_is_refused_before_anything_loads():
    """On the meta device load_state_dict loads nothing (a warning); the hyper-parameters
    were restored all the same: a half-loaded loss."""
    with torch.device("meta"):
        loss = ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4, rank=0, world_size=2)
    margin = loss.loss.margin
    with pytest.raises(ValueError, match="meta device, where nothing loads"):
        load_into(loss, _shards(CurricularFaceLoss(10, 4, margin=0.1))[0])
    assert loss.loss.margin == margin


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(format="pml_margins.sharded/2"), r"has format .*sharded/2"),
        (lambda c: c.pop("format"), r"has format None"),
        (lambda c: c.pop("loss_kwargs"), r"lacks loss_kwargs"),
        (lambda c: c.pop("class_range"), r"lacks class_range"),
    ],
)
def test_checkpoints_of_another_format_or_missing_a_field_are_named(edit, match):
    """Only load_shard checked the format; a missing field was a bare KeyError."""
    shards = _shards(ArcFaceLoss(10, 4))
    edit(shards[1])
    with pytest.raises(ValueError, match=match):
        merge_shards(shards)
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=1, world_size=2)
    with pytest.raises(ValueError, match=match):
        load_into(loss, shards[1])
    full = from_single_process_loss(ArcFaceLoss(10, 4))
    edit(full)
    for use in (to_single_process_loss, lambda c: split_checkpoint(c, 2)):
        with pytest.raises(ValueError, match=match):
            use(full)


def test_a_nan_buffer_is_one_runs():
    """A diverged run's NaN t made its own shards "of different runs" (NaN != NaN)."""
    loss = CurricularFaceLoss(7, 4)
    loss.t.fill_(float("nan"))
    merged = merge_shards(split_checkpoint(from_single_process_loss(loss), 2))
    assert merged["state_dict"]["t"].isnan().all()


def test_a_bias_free_softmax_round_trips():
    """SoftmaxLoss(bias=False) was rebuilt with a bias: a raw RuntimeError."""
    loss = SoftmaxLoss(7, 4, bias=False)
    again = to_single_process_loss(from_single_process_loss(loss))
    assert not again.use_bias and torch.equal(again.W, loss.W)
    full = from_single_process_loss(SoftmaxLoss(7, 4))
    full["loss_kwargs"]["bias"] = False  # a state the arguments do not build
    message = r"cannot be loaded into the .*SoftmaxLoss .*Unexpected key.*bias.*loss_kwargs"
    with pytest.raises(ValueError, match=message):
        to_single_process_loss(full)


def test_the_modules_own_load_state_dict_makes_the_same_checks():
    """ShardedMarginSoftmaxLoss.load_state_dict cast a bool W and 'loaded' into meta
    tensors, where load_into refused both (review); a bf16 resume loads."""
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2)
    saved = loss.state_dict()
    wrong = {**saved, "loss.W": saved["loss.W"].bool()}
    before = loss.W_local.detach().clone()
    with pytest.raises(ValueError, match=r"W torch.bool vs torch.float32"):
        loss.load_state_dict(wrong)
    assert torch.equal(loss.W_local, before)
    with torch.device("meta"):
        meta = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="meta device, where nothing loads"):
        meta.load_state_dict(saved)
    low = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2).bfloat16()
    low.load_state_dict(saved)
    assert torch.equal(low.W_local, saved["loss.W"].bfloat16())


# --- third review of 2026-12-01 ---------------------------------------------------------


def test_a_refused_state_loads_no_hyperparameter_either():
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.5)
    shard = shard_checkpoint(
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.3)
    )
    before = loss.W_local.detach().clone()
    w = shard["state_dict"]["W"]
    for bad in (w.to_sparse(), torch.empty(4, 10, device="meta"), w.to(torch.complex64)):
        with pytest.raises(ValueError, match="state_dict must be a dict of dense, real tensors"):
            load_into(loss, {**shard, "state_dict": {"W": bad}})
        assert loss.loss.margin == 0.5 and torch.equal(loss.W_local, before)
        full = {**from_single_process_loss(ArcFaceLoss(10, 4)), "state_dict": {"W": bad}}
        for convert in (to_single_process_loss, lambda c: split_checkpoint(c, 2)):
            with pytest.raises(ValueError, match="dense, real tensors with values"):
                convert(full)  # (a sparse loss whose forward failed; a raw torch error)


def test_a_load_that_torch_refuses_leaves_the_hyperparameters(monkeypatch):
    loss = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.5)
    shard = shard_checkpoint(
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1, margin=0.3)
    )

    def refuse(*args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for ArcFaceLoss:\n  something")

    monkeypatch.setattr(loss.loss, "load_state_dict", refuse)
    with pytest.raises(ValueError, match=r"state cannot be loaded .*something"):
        load_into(loss, shard)
    assert loss.loss.margin == 0.5


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(rank="0"), "wrong type or range: rank must be an int >= 0"),
        (lambda c: c.update(world_size=3.0), "world_size must be an int >= 1"),
        (lambda c: c.update(loss_kwargs=None), "loss_kwargs must be a dict"),
        (lambda c: c["state_dict"].update(W=[[0.0]]), "state_dict must be a dict of dense"),
        (lambda c: c.update(class_range=(0, "5")), "class_range must be a pair of ints"),
        (lambda c: c.update(num_classes=True), "num_classes must be an int >= 1"),
    ],
)
def test_fields_of_the_wrong_type_are_named(edit, match):
    shard = split_checkpoint(from_single_process_loss(ArcFaceLoss(10, 6)), 2)[0]
    edit(shard)
    with pytest.raises(ValueError, match=match):
        merge_shards([shard])


def test_shards_whose_w_does_not_fit_the_embedding_size_are_named():
    shards = split_checkpoint(from_single_process_loss(ArcFaceLoss(10, 6)), 2)
    shards[1]["state_dict"]["W"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shard 1's W has 5 rows, its embedding_size is 6"):
        merge_shards(shards)
    for shard in shards:  # every shard 5 rows where the checkpoints say 6
        shard["state_dict"]["W"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shard 0's W has 5 rows"):
        merge_shards(shards)


def test_a_checkpoint_that_builds_no_loss_is_named():
    full = from_single_process_loss(ArcFaceLoss(10, 6, easy_margin=True))
    for name in ("no_such_module.ArcFaceLoss", "ArcFaceLoss", ".ArcFaceLoss", "..x.ArcFaceLoss"):
        with pytest.raises(ValueError, match=r"is not a (ClassWeightLoss subclass|class's dotted)"):
            to_single_process_loss({**full, "loss_type": name})
    cosface = "pml_margins.losses.cosface.CosFaceLoss"
    with pytest.raises(ValueError, match=r"loss_kwargs do not build a .*CosFaceLoss"):
        to_single_process_loss({**full, "loss_type": cosface})


def test_the_partial_fc_rate_is_kept_by_every_conversion():
    single = ArcFaceLoss(10, 6, sample_rate=0.3)
    assert to_single_process_loss(from_single_process_loss(single)).sample_rate == 0.3
    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 6, rank=0, world_size=1, sample_rate=0.5)
    assert to_single_process_loss(shard_checkpoint(sharded)).sample_rate == 0.5
    full_softmax = split_checkpoint(from_single_process_loss(ArcFaceLoss(10, 6)), 1)[0]
    load_into(sharded, full_softmax)  # the run's own choice: it goes on sampling
    assert sharded.sample_rate == 0.5


def test_adacos_keeps_the_scale_it_started_from():
    loss = AdaCosLoss(10, 6, scale=10.0)
    with torch.no_grad():
        loss.scale.fill_(3.5)  # moved by training
    back = to_single_process_loss(from_single_process_loss(loss))
    assert back.scale.item() == 3.5
    back.reset_running_stats()
    assert back.scale.item() == 10.0


class _NoSampleRate(ArcFaceLoss):
    """A subclass whose constructor takes no sample_rate (a loss of a user's own)."""

    def __init__(self, num_classes, embedding_size, margin=0.5, scale=64.0, easy_margin=False):
        super().__init__(
            num_classes, embedding_size, margin=margin, scale=scale, easy_margin=easy_margin
        )


def test_a_loss_that_samples_no_class_records_no_rate():
    # every checkpoint carried sample_rate=1.0, which such a subclass cannot be built with
    back = to_single_process_loss(from_single_process_loss(_NoSampleRate(10, 4)))
    assert type(back) is _NoSampleRate
    sharded = ShardedMarginSoftmaxLoss(_NoSampleRate, 10, 4, rank=0, world_size=1)
    assert "sample_rate" not in shard_checkpoint(sharded)["loss_kwargs"]
    assert type(to_single_process_loss(shard_checkpoint(sharded))) is _NoSampleRate


@pytest.mark.parametrize("name", ["pml_margins.__main__.ArcFaceLoss", "this.ArcFaceLoss"])
def test_a_checkpoints_loss_type_imports_no_module(name, capsys):
    # the CLI's module parsed the command line and exited; "this" printed its poem
    full = from_single_process_loss(ArcFaceLoss(5, 4))
    with pytest.raises(ValueError, match="checkpoint loss_type"):
        to_single_process_loss({**full, "loss_type": name})
    assert capsys.readouterr().out == ""


def test_a_loss_class_defined_again_loads_as_the_name_is_bound_now():
    import sys
    import types

    from pml_margins.losses import CosFaceLoss, ElasticFaceLoss

    cell = types.ModuleType("notebook_cell_for_test")
    sys.modules[cell.__name__] = cell
    try:
        cell.ElasticFaceLoss, cell.CosFaceLoss = ElasticFaceLoss, CosFaceLoss
        exec("class MyLoss(ElasticFaceLoss): pass", cell.__dict__)  # the first version
        kept = cell.MyLoss(5, 4)  # (still alive)
        exec("class MyLoss(CosFaceLoss): pass", cell.__dict__)  # the cell edited, re-run
        back = to_single_process_loss(from_single_process_loss(cell.MyLoss(5, 4)))
        assert type(back) is cell.MyLoss and type(kept) is not cell.MyLoss
    finally:
        del sys.modules[cell.__name__]


def test_two_local_classes_of_one_name_are_refused_as_ambiguous():
    from pml_margins.losses import CosFaceLoss, ElasticFaceLoss

    def make(base):
        class Local(base):
            pass

        return Local

    first, second = make(CosFaceLoss), make(ElasticFaceLoss)
    with pytest.raises(ValueError, match="names 2 classes"):
        to_single_process_loss(from_single_process_loss(first(5, 4)))
    assert second is not first


@pytest.mark.parametrize(
    "name",
    [
        "torch._dynamo.Foo",  # a lazy module's __getattr__ imported ~800 modules
        "torch.onnx.Foo",
        "torch.classes.foo.Bar",  # torch's namespace raised its own RuntimeError
        "pml_margins.losses.__init__.ArcFaceLoss",  # ran the package's __init__ again
    ],
)
def test_a_checkpoints_loss_type_is_read_without_running_code(name):
    import sys

    full = from_single_process_loss(ArcFaceLoss(5, 4))
    before = set(sys.modules)
    with pytest.raises(ValueError, match="loss_type"):
        to_single_process_loss({**full, "loss_type": name})
    assert set(sys.modules) == before


@pytest.mark.parametrize(("rebound", "shown"), [(3, "int"), (None, "NoneType")])
def test_a_name_bound_now_to_something_else_is_refused_not_resolved_to_a_stale_class(
    rebound, shown
):
    import sys
    import types

    from pml_margins.losses import CosFaceLoss

    cell = types.ModuleType("notebook_cell_rebound")
    sys.modules[cell.__name__] = cell
    try:
        cell.CosFaceLoss = CosFaceLoss
        exec("class MyLoss(CosFaceLoss): pass", cell.__dict__)
        full = from_single_process_loss(cell.MyLoss(5, 4))
        kept = cell.MyLoss  # (still alive)
        cell.MyLoss = rebound  # rebound to something that is not a loss (None counts)
        with pytest.raises(ValueError, match=f"is bound to '{shown}'"):
            to_single_process_loss(full)
        assert kept is not None
    finally:
        del sys.modules[cell.__name__]


def test_a_loss_class_of_a_script_round_trips(monkeypatch):
    import sys

    # a class defined in the script run (__main__; __mp_main__ in spawned workers)
    main_loss = type("MainLoss", (ArcFaceLoss,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "MainLoss", main_loss, raising=False)
    assert type(to_single_process_loss(from_single_process_loss(main_loss(5, 4)))) is main_loss


def test_a_name_through_an_object_runs_none_of_its_code():
    import warnings

    full = from_single_process_loss(ArcFaceLoss(5, 4))
    name = "torch.distributed.distributed_c10d.reduce_op.Foo"  # its __class__ warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="checkpoint loss_type"):
            to_single_process_loss({**full, "loss_type": name})


def test_a_saved_value_the_loss_refuses_is_named_as_the_checkpoints() -> None:
    """A checkpoint holding a value the loss now refuses (a negative ArcFace margin, taken
    for a while) raised a bare "margin must be >= 0": it now says the value is the
    checkpoint's, and a keyword argument still builds the loss."""
    full = from_single_process_loss(ArcFaceLoss(10, 8, margin=0.2))
    full["loss_kwargs"]["margin"] = -0.1
    with pytest.raises(ValueError, match=r"checkpoint's loss_kwargs .*margin must be >= 0"):
        to_single_process_loss(full)
    assert to_single_process_loss(full, margin=0.1).margin == 0.1
    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 8, rank=0, world_size=1, margin=0.3)
    with pytest.raises(ValueError, match=r"shard's saved margin=-0\.1 is refused .*>= 0"):
        load_into(sharded, split_checkpoint(full, 1)[0])
    assert sharded.loss.margin == 0.3


def test_split_and_merged_checkpoints_hold_their_own_loss_kwargs():
    """A shard's loss_kwargs was the source checkpoint's dict: editing one shard's edited
    every shard, the merged checkpoint and the source (found by review)."""
    full = from_single_process_loss(ArcFaceLoss(6, 4))
    shards = split_checkpoint(full, 2)
    merged = merge_shards(shards)
    shards[1]["loss_kwargs"]["margin"] = 0.1
    assert full["loss_kwargs"]["margin"] == shards[0]["loss_kwargs"]["margin"] == 0.5
    assert merged["loss_kwargs"]["margin"] == 0.5
    merged["loss_kwargs"]["scale"] = 8.0
    assert shards[0]["loss_kwargs"]["scale"] == full["loss_kwargs"]["scale"] == 64.0
