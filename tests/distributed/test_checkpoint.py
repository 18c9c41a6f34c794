"""Per-shard checkpoints: save on 2 ranks, load on 3 ranks or into the single-process loss."""

from __future__ import annotations

import pytest
import torch

from pml_margins.distributed import ShardedMarginSoftmaxLoss
from pml_margins.distributed.checkpoint import (
    from_single_process_loss,
    load_into,
    load_shard,
    merge_shards,
    reshard,
    save_shard,
    shard_checkpoint,
    split_checkpoint,
    to_single_process_loss,
)
from pml_margins.distributed.partial_fc import sample_local_classes
from pml_margins.losses import AdaCosLoss, ArcFaceLoss, CurricularFaceLoss, SoftmaxLoss
from tests.distributed import cases
from tests.distributed.test_sharded_loss import F64, check_rank, load_results, single_process


def _trained_reference() -> ArcFaceLoss:
    """The single-process loss after the same SGD step the 2-rank run took."""
    ref = cases.reference_loss(cases.SPEC_BY_ID["arcface"])
    single_process(ref, *cases.batch(2, cases.NUM_CLASSES))
    with torch.no_grad():
        ref.W.sub_(cases.LR * ref.W.grad)
    ref.W.grad = None
    return ref


def test_two_rank_shards_merge_to_the_single_process_step(runs) -> None:
    shards = [load_shard(runs[2] / f"ckpt_{r}.pt") for r in range(2)]
    ref = _trained_reference()
    loss = to_single_process_loss(shards)
    assert type(loss) is ArcFaceLoss
    assert (loss.margin, loss.scale, loss.num_classes) == (ref.margin, ref.scale, 11)
    torch.testing.assert_close(loss.W.double(), ref.W, **F64)


def test_two_rank_checkpoint_loaded_on_three_ranks(runs) -> None:
    """The 3-rank run loaded the re-sharded 2-rank checkpoint: same loss and gradients."""
    shards = [load_shard(runs[2] / f"ckpt_{r}.pt") for r in range(2)]
    ref = to_single_process_loss(shards).double()
    loss, x_grad = single_process(ref, *cases.batch(3, cases.NUM_CLASSES))
    for rank, result in enumerate(load_results(runs[3], "resharded", 3)):
        check_rank(result, rank, 3, loss, x_grad, ref, F64)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_split_merge_round_trip(world_size: int) -> None:
    ref = SoftmaxLoss(7, 3)
    full = from_single_process_loss(ref, bias=True)
    shards = split_checkpoint(full, world_size)
    assert [s["class_range"][1] - s["class_range"][0] for s in shards] == [
        len(c) for c in torch.arange(7).tensor_split(world_size)
    ]
    merged = merge_shards(list(reversed(shards)))
    for key in ("W", "bias"):
        assert torch.equal(merged["state_dict"][key], ref.state_dict()[key])
    for n in (1, 2, 5):
        again = merge_shards(reshard(shards, n))
        assert torch.equal(again["state_dict"]["W"], ref.W.detach())


def test_files_and_sharded_module_round_trip(tmp_path) -> None:
    """Offline (rank/world_size given): build shards, save, load into the single-process loss."""
    ref = ArcFaceLoss(10, 4, margin=0.3, scale=16.0)
    full = from_single_process_loss(ref, margin=0.3, scale=16.0)
    paths = []
    for rank, shard in enumerate(split_checkpoint(full, 3)):
        module = ShardedMarginSoftmaxLoss(
            ArcFaceLoss, 10, 4, rank=rank, world_size=3, margin=0.3, scale=16.0
        )
        load_into(module, shard)
        paths.append(tmp_path / f"s{rank}.pt")
        save_shard(module, paths[-1])
    loss = to_single_process_loss([load_shard(p) for p in paths])
    assert (loss.margin, loss.scale) == (0.3, 16.0)
    assert torch.equal(loss.W, ref.W)


def test_bad_checkpoints(tmp_path) -> None:
    shards = split_checkpoint(from_single_process_loss(ArcFaceLoss(10, 4)), 3)
    with pytest.raises(ValueError, match="one shard per rank"):
        merge_shards(shards[:2])
    with pytest.raises(ValueError, match="one shard per rank"):
        merge_shards([shards[0], shards[0], shards[2]])
    other = split_checkpoint(from_single_process_loss(ArcFaceLoss(11, 4)), 3)
    with pytest.raises(ValueError, match="disagree"):
        merge_shards([shards[0], shards[1], other[2]])
    module = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="reshard"):
        load_into(module, shards[0])
    torch.save({"W": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a"):
        load_shard(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="merged"):
        split_checkpoint(shards[0], 2)


def test_resumed_run_draws_the_same_classes(tmp_path) -> None:
    """The sampler's RNG state travels with the shard: step 2 after a restart is the same."""
    y = torch.tensor([0, 1, 2, 3])

    def draw(shard: ShardedMarginSoftmaxLoss) -> torch.Tensor:
        """The classes this (offline) shard's forward would keep: its sampler's next draw."""
        generator = shard._generator_for(y.device)
        args = (y, shard.class_start, shard.num_local, shard.sample_rate, generator)
        return sample_local_classes(*args)[0]

    run = ShardedMarginSoftmaxLoss(ArcFaceLoss, 60, 4, rank=1, world_size=2, sample_rate=0.2)
    draw(run)
    save_shard(run, tmp_path / "s1.pt")
    second = draw(run)
    resumed = ShardedMarginSoftmaxLoss(
        ArcFaceLoss, 60, 4, rank=1, world_size=2, sample_rate=0.2, seed=99
    )
    load_into(resumed, load_shard(tmp_path / "s1.pt"))
    assert torch.equal(draw(resumed), second)
    assert torch.equal(resumed.W_local, run.W_local)
    fresh = ShardedMarginSoftmaxLoss(ArcFaceLoss, 60, 4, rank=1, world_size=2, sample_rate=0.2)
    assert not torch.equal(draw(fresh), second)  # its first draw, not the resumed second
    rank0 = ShardedMarginSoftmaxLoss(ArcFaceLoss, 60, 4, rank=0, world_size=2, sample_rate=0.2)
    shards = [shard_checkpoint(rank0), load_shard(tmp_path / "s1.pt")]
    assert all(s["sampler_state"] is None for s in reshard(shards, 3))


@pytest.mark.parametrize("cast", [None, torch.float64])
@pytest.mark.parametrize("loss_type", [AdaCosLoss, CurricularFaceLoss, ArcFaceLoss])
def test_single_process_checkpoint_keeps_every_tensor_and_dtype(loss_type, cast) -> None:
    """Buffers too, in their own dtype: AdaCos's float64 scale beside a float32 W (uncast)."""
    loss = loss_type(10, 4)
    loss = loss if cast is None else loss.to(cast)
    x = torch.randn(8, 4, dtype=loss.W.dtype)
    loss(x, torch.randint(0, 10, (8,)))  # a training step moves the buffers
    for full in (
        from_single_process_loss(loss),
        merge_shards(split_checkpoint(from_single_process_loss(loss), 3)),
    ):
        back = to_single_process_loss(full).state_dict()
        expected = loss.state_dict()
        assert back.keys() == expected.keys()
        for key, value in expected.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_checkpoints_keep_current_hyperparameters_and_their_loss_type(tmp_path) -> None:
    """A scheduler moved the margin: the checkpoint rebuilds the loss with the current one;
    a shard of another loss type is refused."""
    from pml_margins.losses import CosFaceLoss
    from pml_margins.schedules import MarginScheduler

    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, margin=0.1)
    MarginScheduler(sharded.loss, 0.1, 0.5, total_steps=1).step()
    save_shard(sharded, tmp_path / "s.pt")
    assert to_single_process_loss(load_shard(tmp_path / "s.pt")).margin == 0.5
    with pytest.raises(ValueError, match=r"shard is of a .*ArcFaceLoss, the loss a .*CosFaceLoss"):
        load_into(ShardedMarginSoftmaxLoss(CosFaceLoss, 10, 4), load_shard(tmp_path / "s.pt"))


def test_checkpoints_keep_hyperparameters_left_at_their_defaults_and_moved_since() -> None:
    """Hyper-parameters not given to the constructor are recorded too: a scheduler may
    have moved them (ArcFace's margin, SphereFace's lambda), and a single-process loss
    is recorded as it is."""
    from pml_margins.losses import SphereFaceLoss
    from pml_margins.schedules import MarginScheduler, SphereFaceLambdaScheduler

    sharded = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4)
    MarginScheduler(sharded.loss, 0.1, 0.5, total_steps=4).step()
    assert to_single_process_loss(shard_checkpoint(sharded)).margin == pytest.approx(0.2)
    sphere = ShardedMarginSoftmaxLoss(SphereFaceLoss, 10, 4)
    SphereFaceLambdaScheduler(sphere.loss).step()
    moved = sphere.loss.lambda_
    assert moved > 0 and to_single_process_loss(shard_checkpoint(sphere)).lambda_ == moved
    single = ArcFaceLoss(10, 4, margin=0.2, easy_margin=True)
    back = to_single_process_loss(from_single_process_loss(single))
    assert (back.margin, back.easy_margin) == (0.2, True)
    assert to_single_process_loss(from_single_process_loss(single, margin=0.3)).margin == 0.3


def test_a_checkpoint_before_the_first_sampled_step_resumes_the_same_draws() -> None:
    """Partial FC saved before its first step: loaded into a loss built with another
    seed, the classes drawn are those of the saved loss."""
    x, y = torch.randn(6, 4), torch.tensor([0, 3, 3, 7, 11, 20])

    def drawn(loss):
        loss(x, y)
        return loss.sampler_state()

    saved = ShardedMarginSoftmaxLoss(ArcFaceLoss, 30, 4, sample_rate=0.2, seed=3)
    checkpoint = shard_checkpoint(saved)
    assert checkpoint["sampler_state"] is not None
    resumed = ShardedMarginSoftmaxLoss(ArcFaceLoss, 30, 4, sample_rate=0.2, seed=99)
    load_into(resumed, checkpoint)
    assert torch.equal(drawn(resumed), drawn(saved))
    assert shard_checkpoint(ShardedMarginSoftmaxLoss(ArcFaceLoss, 30, 4))["sampler_state"] is None
