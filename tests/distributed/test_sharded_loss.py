"""Sharded margin softmax on 2 and 3 gloo ranks equals the single-process loss."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest
import torch
from pytorch_metric_learning.reducers import SumReducer

from pml_margins.distributed import shard_range
from pml_margins.distributed.partial_fc import num_sampled
from pml_margins.distributed.sharding import class_columns
from pml_margins.losses import ClassWeightLoss
from tests.distributed import cases
from tests.distributed.conftest import WORLD_SIZES
from tests.distributed.workers import HALF_CASES
from tests.losses.reference import half_ulps

F64 = {"rtol": 1e-10, "atol": 1e-12}
TOL = {torch.float64: F64, torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def load_results(out: pathlib.Path, name: str, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}_{r}.pt", weights_only=False) for r in range(world_size)]


def single_process(
    loss_fn: ClassWeightLoss, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    loss = loss_fn(x, y)
    loss.backward()
    return loss.detach(), x.grad


def check_rank(
    result: dict[str, Any],
    rank: int,
    world_size: int,
    loss: torch.Tensor,
    x_grad: torch.Tensor,
    loss_fn: ClassWeightLoss,
    tol: dict[str, float],
) -> None:
    torch.testing.assert_close(result["loss"], loss, **tol)
    torch.testing.assert_close(result["x_grad"], x_grad[cases.rows(world_size, rank)], **tol)
    start, end = result["range"]
    per = loss_fn.W.shape[1] // loss_fn.num_classes  # sub-centres: K columns per class
    torch.testing.assert_close(result["w_grad"], loss_fn.W.grad[:, start * per : end * per], **tol)
    if getattr(loss_fn, "bias", None) is not None:
        torch.testing.assert_close(result["bias_grad"], loss_fn.bias.grad[start:end], **tol)
    # buffers moved by the step (AdaCos's scale, AdaFace's norm statistics)
    buffers = dict(loss_fn.named_buffers())
    assert result["buffers"].keys() == buffers.keys()
    for name, value in buffers.items():
        torch.testing.assert_close(result["buffers"][name], value, **tol)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", [*cases.SPEC_BY_ID, "arcface_float32", "cosface_sum_reducer"])
def test_equals_single_process(runs, world_size: int, case: str) -> None:
    """Loss, embedding gradients and every W (and bias) shard's gradient match."""
    dtype = torch.float32 if case.endswith("float32") else torch.float64
    spec = cases.SPEC_BY_ID[case.removesuffix("_float32").removesuffix("_sum_reducer")]
    loss_fn = cases.reference_loss(spec, cases.NUM_CLASSES, dtype)
    if case.endswith("sum_reducer"):
        loss_fn.reducer = SumReducer()
    loss, x_grad = single_process(loss_fn, *cases.batch(world_size, cases.NUM_CLASSES, dtype=dtype))
    ranks = [r[case] for r in load_results(runs[world_size], "losses", world_size)]
    for rank, result in enumerate(ranks):
        assert result["range"] == shard_range(cases.NUM_CLASSES, world_size, rank)
        assert result["sampled"] is None
        check_rank(result, rank, world_size, loss, x_grad, loss_fn, TOL[dtype])
        for name, value in result["buffers"].items():  # the same on every rank, bit for bit
            assert torch.equal(value, ranks[0]["buffers"][name]), name


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_embeddings_gradient_rounded_once(runs, world_size: int, case: str) -> None:
    """Half embeddings (half or float32 W): the loss is formed in float32 as in one process
    and each row's gradient, whose shares come from every rank's classes, is summed over
    the ranks in float32 and rounded once: within an ulp of the float64 gradient (it was
    up to ~800 bf16 ulps when each rank's share was rounded and the shares summed in bf16)."""
    spec_id, x_dtype, w_dtype = HALF_CASES[case]
    spec = cases.SPEC_BY_ID[spec_id]
    x, y = cases.batch(world_size, cases.NUM_CLASSES, dtype=x_dtype)
    loss_fn = cases.reference_loss(spec, cases.NUM_CLASSES, w_dtype)
    loss, x_grad = single_process(loss_fn, x, y)
    exact_fn = cases.reference_loss(spec, cases.NUM_CLASSES, torch.float64)
    with torch.no_grad():
        for ours, exact in zip(loss_fn.parameters(), exact_fn.parameters(), strict=True):
            exact.copy_(ours)  # the same (rounded) weights, in float64
    exact_loss, exact_grad = single_process(exact_fn, x.double(), y)
    results = load_results(runs[world_size], "losses", world_size)
    sharded = torch.cat([r[case]["x_grad"] for r in results])
    assert sharded.dtype == x_dtype and x_grad.dtype == x_dtype
    assert half_ulps(x_grad, exact_grad) <= 1.0  # (one process: the bar)
    assert half_ulps(sharded, exact_grad) <= 1.0
    for result in results:
        assert result[case]["loss"].dtype == loss.dtype == torch.float32
        torch.testing.assert_close(result[case]["loss"].double(), exact_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("spec_id", cases.SAMPLED_SPECS)
def test_partial_fc(runs, world_size: int, spec_id: str) -> None:
    """sample_rate=0.5: the softmax over the union of kept classes; others get no gradient."""
    spec = cases.SPEC_BY_ID[spec_id]
    c = cases.SAMPLED_CLASSES
    x, y = cases.batch(world_size, c)
    results = [r[spec_id] for r in load_results(runs[world_size], "sampled", world_size)]
    first, again = [r[0] for r in results], [r[1] for r in results]
    kept = torch.cat([r["sampled"] for r in first])
    for rank, (a, b) in enumerate(zip(first, again, strict=True)):
        start, end = shard_range(c, world_size, rank)
        positives = y[(y >= start) & (y < end)].unique()
        assert torch.isin(positives, a["sampled"]).all(), "a positive class was dropped"
        expected = max(len(positives), num_sampled(cases.SAMPLE_RATE, end - start))
        assert len(a["sampled"]) == expected
        assert len(a["sampled"].unique()) == expected
        assert ((a["sampled"] >= start) & (a["sampled"] < end)).all()
        assert torch.equal(a["sampled"], b["sampled"]), "same seed, different draw"
    assert len(kept) < c, "nothing was sampled out"

    full = cases.reference_loss(spec, c)
    sub = spec.build(len(kept), cases.EMBEDDING_SIZE).double()
    columns = class_columns(kept, spec.columns_per_class)  # every sub-centre of a kept class
    with torch.no_grad():
        sub.W.copy_(full.W[:, columns])
        if getattr(sub, "bias", None) is not None:
            sub.bias.copy_(full.bias[kept])
    position = torch.full((c,), -1, dtype=torch.long)
    position[kept] = torch.arange(len(kept))
    loss, x_grad = single_process(sub, x, position[y])
    w_grad = torch.zeros_like(full.W)
    w_grad[:, columns] = sub.W.grad
    for rank, result in enumerate(first):
        start, end = result["range"]
        torch.testing.assert_close(result["loss"], loss, **F64)
        torch.testing.assert_close(result["x_grad"], x_grad[cases.rows(world_size, rank)], **F64)
        per = spec.columns_per_class
        torch.testing.assert_close(result["w_grad"], w_grad[:, start * per : end * per], **F64)
        if result["bias_grad"] is not None:
            b_grad = torch.zeros(c, dtype=torch.float64)
            b_grad[kept] = sub.bias.grad
            torch.testing.assert_close(result["bias_grad"], b_grad[start:end], **F64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("impl", ["pml", "pml_margins"])
def test_circle_loss_under_pml_wrapper(runs, world_size: int, impl: str) -> None:
    """CircleLoss in PML's DistributedLossWrapper: world_size x the single-process loss.

    The wrapper returns ``world_size * L`` with gradients only through the local
    rows, so that DDP's average over ranks gives the backbone exactly the
    single-process gradient.
    """
    losses = cases.circle_losses()  # ("pml": the harness's control, PML's own loss)
    x, y = cases.batch(world_size, 3, seed=5, equal=True)
    loss, x_grad = single_process(losses[impl](m=0.4, gamma=80), x, y)
    for rank, results in enumerate(load_results(runs[world_size], "circle", world_size)):
        result = results[impl]
        torch.testing.assert_close(result["loss"] / world_size, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            result["x_grad"] / world_size,
            x_grad[cases.rows(world_size, rank, equal=True)],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ddp_backbone_gets_single_process_gradient_over_world_size(runs, world_size) -> None:
    """DDP averages the ranks' backbone gradients: the single-process one / world_size."""
    backbone = cases.backbone()
    features, y = cases.backbone_batch(world_size)
    loss_fn = cases.reference_loss(cases.SPEC_BY_ID["arcface"])
    loss_fn(backbone(features), y).backward()
    for result in load_results(runs[world_size], "ddp", world_size):
        torch.testing.assert_close(result["weight_grad"], backbone.weight.grad / world_size, **F64)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices")
@pytest.mark.parametrize("spec_id", ["arcface", "sphereface", "softmax"])
def test_nccl_equals_single_process(tmp_path_factory, spec_id: str) -> None:
    from tests.distributed.harness import run_workers

    out = tmp_path_factory.getbasetemp() / "nccl"
    if not (out / "losses_0.pt").exists():
        run_workers("tests.distributed.workers.losses_cuda", 2, out, backend="nccl")
    loss_fn = cases.reference_loss(cases.SPEC_BY_ID[spec_id])
    loss, x_grad = single_process(loss_fn, *cases.batch(2, cases.NUM_CLASSES))
    for rank, results in enumerate(load_results(out, "losses", 2)):
        check_rank(results[spec_id], rank, 2, loss, x_grad, loss_fn, F64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_input_on_one_rank_raises_on_every_rank(runs, world_size: int) -> None:
    """Rank 1's bad batch (rank 0's empty reference slice): each rank raises at once, the
    bad one naming the problem, the others saying another rank's input is invalid."""
    seen = load_results(runs[world_size], "bad_input", world_size)
    own = {
        "nan": "embeddings contains NaN or Inf",
        "label": "labels must lie in \\[0, 10\\)",
        "width": "embeddings has width 5",
        "knn_nan": "reference_shard contains NaN or Inf",
        "knn_width": "reference_shard has width 3",
        "sampler_state": "sampler state \\(16 bytes\\) does not fit a cpu generator",
    }
    for rank, errors in enumerate(seen):
        for case, message in own.items():
            expected = message if rank == 1 else "another rank's input is invalid"
            assert re.search(expected, errors[case]), (rank, case, errors[case])
        assert "embeddings dtypes differ" in errors["dtype"]
        for case in (
            "num_classes",
            "sample_rate",
            "training modes",
            "W dtypes",
            "collect_stats",
            "value checks",
        ):
            assert f"ranks' {case} differ" in errors[case], (rank, errors[case])
        assert "ranks' embeddings requiring grad differ" in errors["grad"]
        for case in (
            "loss_class",
            "loss_dynamic",
            "loss_margin",
            "loss_reducer",
            "loss_bias",
            "loss_distance",
        ):
            assert "ranks' losses (their class and hyper-parameters) differ" in errors[case]
        assert "ranks' loss buffers (scale) differ" in errors["buffers_scale"]
        assert "ranks' loss buffers (t) differ" in errors["buffers_t"]
        assert "ranks' loss buffers (t) differ" in errors["buffers_nan"]
        assert "nan" in errors["buffers_nan"]
        for case in ("buffers_shape", "loss_inner_reducer"):
            assert "ranks' losses (their class and hyper-parameters) differ" in errors[case]
        assert "ranks' scales differ" in errors["functional_scale_value"]
        for case, name in (
            ("calc_label_dtypes", "reference_labels"),
            ("calc_self_dtypes", "reference"),
            ("calc_own_metric_dtypes", "reference"),
            ("knn_query_dtype", "query"),
        ):
            assert f"ranks' {name} dtypes and shapes past the rows differ" in errors[case]
        # agreeing settings written differently, shards' own dtypes and per-class buffers
        for case in (
            "knn_dtype",
            "same_reducer_bounds",
            "per_class_buffers",
            "functional_scale_written",
        ):
            assert errors[case] == "no error", (rank, case, errors[case])
        invalid = "k must be" if rank == 1 else "another rank's input is invalid"
        assert invalid in errors["knn_k_invalid"], errors["knn_k_invalid"]
        assert "ranks' k, metric, normalize and exclude_self differ" in errors["knn_k_differs"]
        invalid = "metric must be one of" if rank == 1 else "another rank's input is invalid"
        assert invalid in errors["knn_metric"], errors["knn_metric"]
        invalid = "num_threads must be" if rank == 1 else "another rank's input is invalid"
        assert invalid in errors["knn_threads"], errors["knn_threads"]
        for case in ("calc_ref_includes_query", "calc_k", "calc_comparison"):
            assert "ranks' settings (k, metrics, ref_includes_query, ...) differ" in errors[case]
        assert "ranks' query rows differ" in errors["calc_rows"], errors["calc_rows"]
        for case, name in (
            ("calc_query_values", "query values \\(summarized\\)"),
            ("calc_query_labels", "query_labels values"),
            ("knn_query_values", "query values \\(summarized\\)"),
        ):
            assert re.search(f"ranks' {name} differ.*same query set", errors[case]), errors[case]
        assert errors["calc_query_rounding"] == "no error", errors["calc_query_rounding"]
        one = errors["calc_one_query_coordinate"]
        assert re.search(
            r"query values \(summarized\) differ \(2 of 6000 values, the first at 2468", one
        ), one
        empty = "reference is empty" if rank == 0 else "another rank's input is invalid"
        assert empty in errors["empty_reference"]
        # the public sharded function: local checks agreed, then one owner per row
        ranged = "local_target must lie in \\[-1, 3\\)" if rank == 1 else "another rank's"
        assert re.search(ranged, errors["functional_range"]), errors["functional_range"]
        owners = f"rows \\[0, 1\\] are owned by \\[{world_size}, 0\\] ranks"
        assert re.search(owners, errors["functional_owners"]), errors["functional_owners"]
        assert "ranks' numbers of rows differ" in errors["functional_rows"]
        assert "ranks' logits dtypes differ" in errors["functional_dtype"]
        assert "ranks' value checks differ" in errors["functional_value_checks"]
        scaled = "a tensor scale must have one entry" if rank == 1 else "another rank's"
        assert scaled in errors["functional_scale"], errors["functional_scale"]
        for case, own_error in (("miner", "miners"), ("ref_emb", "ref_emb/ref_labels")):
            expected = own_error if rank == 1 else "another rank's input is invalid"
            assert expected in errors[case], (rank, case, errors[case])
        assert (
            f"shard 0 of 1, but its process group makes this process rank {rank} of"
            in (errors["override"])
        )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_elasticface_ranks_use_the_first_ranks_margins(runs, world_size: int) -> None:
    """Ranks seeded differently drew different margins and the loss equalled no
    single-process loss (36.97 against 37.02 and 34.28); now every rank uses the first
    rank's draws: the single-process loss under its seed, and the same last_margins."""
    seen = load_results(runs[world_size], "elastic", world_size)
    for result in seen:
        torch.testing.assert_close(result["value"], seen[0]["expected"])
        torch.testing.assert_close(result["margins"], seen[0]["margins"])
