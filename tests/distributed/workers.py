"""What each rank runs (in a spawned process); results go to ``out/<name>_<rank>.pt``."""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.reducers import SumReducer
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

import pml_margins
from pml_margins.distributed import ShardedMarginSoftmaxLoss, shard_range
from pml_margins.distributed.checkpoint import (
    from_single_process_loss,
    load_into,
    load_shard,
    save_shard,
    split_checkpoint,
)
from pml_margins.distributed.evaluation import (
    ShardedRetrievalAccuracyCalculator,
    sharded_exact_knn,
)
from pml_margins.losses import ArcFaceLoss
from tests.distributed import cases


def _sharded_from_reference(
    spec_id: str, rank: int, world_size: int, num_classes: int, dtype: torch.dtype, **kw: Any
) -> ShardedMarginSoftmaxLoss:
    spec = cases.SPEC_BY_ID[spec_id]
    ref = cases.reference_loss(spec, num_classes, dtype)
    shard = split_checkpoint(from_single_process_loss(ref, **spec.kwargs), world_size)[rank]
    loss = ShardedMarginSoftmaxLoss(
        spec.cls, num_classes, cases.EMBEDDING_SIZE, **spec.kwargs, **kw
    )
    load_into(loss.to(dtype), shard)
    return loss


def _step(
    loss_fn: ShardedMarginSoftmaxLoss,
    rank: int,
    world_size: int,
    num_classes: int,
    dtype: torch.dtype,
    device: str = "cpu",
) -> dict[str, Any]:
    x, y = cases.batch(world_size, num_classes, dtype=dtype)
    part = cases.rows(world_size, rank)
    x_local = x[part].clone().to(device).requires_grad_(True)
    loss = loss_fn.to(device)(x_local, y[part].to(device))
    loss.backward()
    bias = getattr(loss_fn.loss, "bias", None)
    sampled = loss_fn.sampled_classes
    return {
        "loss": loss.detach().cpu(),
        "x_grad": x_local.grad.cpu(),
        "w_grad": loss_fn.W_local.grad.cpu(),
        "bias_grad": None if bias is None else bias.grad.cpu(),
        "sampled": None if sampled is None else sampled.cpu(),
        "range": (loss_fn.class_start, loss_fn.class_end),
        "buffers": {k: v.detach().cpu().clone() for k, v in loss_fn.loss.named_buffers()},
    }


def losses(rank: int, world_size: int, out: pathlib.Path) -> None:
    """Every class-weight loss, unsampled: loss and gradients, float64 and one float32."""
    result = {}
    for spec_id in cases.SPEC_BY_ID:
        loss_fn = _sharded_from_reference(
            spec_id, rank, world_size, cases.NUM_CLASSES, torch.float64
        )
        result[spec_id] = _step(loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float64)
    loss_fn = _sharded_from_reference("arcface", rank, world_size, cases.NUM_CLASSES, torch.float32)
    result["arcface_float32"] = _step(loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float32)
    loss_fn = _sharded_from_reference(
        "cosface", rank, world_size, cases.NUM_CLASSES, torch.float64, reducer=SumReducer()
    )
    result["cosface_sum_reducer"] = _step(
        loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float64
    )
    for case, (spec_id, x_dtype, w_dtype) in HALF_CASES.items():
        loss_fn = _sharded_from_reference(spec_id, rank, world_size, cases.NUM_CLASSES, w_dtype)
        result[case] = _step(loss_fn, rank, world_size, cases.NUM_CLASSES, x_dtype)
    torch.save(result, out / f"losses_{rank}.pt")


#: half embeddings: (spec, embeddings dtype, W dtype); each row's gradient has a share
#: from every rank (every shard of W), summed over the ranks before the one rounding
HALF_CASES = {
    "arcface_bf16_w_float32": ("arcface", torch.bfloat16, torch.float32),
    "cosface_bf16": ("cosface", torch.bfloat16, torch.bfloat16),
    "softmax_fp16": ("softmax", torch.float16, torch.float16),
    "adaface_bf16_w_float32": ("adaface_spread", torch.bfloat16, torch.float32),
}


def losses_cuda(rank: int, world_size: int, out: pathlib.Path) -> None:
    """The NCCL path: a few losses on CUDA, unsampled and with Partial FC."""
    result = {}
    for spec_id in ("arcface", "sphereface", "softmax"):
        loss_fn = _sharded_from_reference(
            spec_id, rank, world_size, cases.NUM_CLASSES, torch.float64
        )
        result[spec_id] = _step(loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float64, "cuda")
    torch.save(result, out / f"losses_{rank}.pt")


def sampled(rank: int, world_size: int, out: pathlib.Path) -> None:
    """Partial FC at sample_rate 0.5: loss, gradients, kept classes; same seed, same draw."""
    result = {}
    for spec_id in cases.SAMPLED_SPECS:
        runs = []
        for _ in range(2):
            loss_fn = _sharded_from_reference(
                spec_id,
                rank,
                world_size,
                cases.SAMPLED_CLASSES,
                torch.float64,
                sample_rate=cases.SAMPLE_RATE,
                seed=3,
            )
            runs.append(_step(loss_fn, rank, world_size, cases.SAMPLED_CLASSES, torch.float64))
        result[spec_id] = runs
    torch.save(result, out / f"sampled_{rank}.pt")


def checkpoint(rank: int, world_size: int, out: pathlib.Path, load_from: str | None) -> None:
    """One SGD step on the shard then save it; or load re-sharded shards and evaluate."""
    if load_from is None:
        loss_fn = _sharded_from_reference(
            "arcface", rank, world_size, cases.NUM_CLASSES, torch.float64
        )
        _step(loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float64)
        with torch.no_grad():
            loss_fn.W_local.sub_(cases.LR * loss_fn.W_local.grad)
        save_shard(loss_fn, out / f"ckpt_{rank}.pt")
        return
    shard = load_shard(pathlib.Path(load_from) / f"ckpt_{rank}.pt")
    spec = cases.SPEC_BY_ID["arcface"]
    loss_fn = ShardedMarginSoftmaxLoss(
        spec.cls, shard["num_classes"], shard["embedding_size"], **shard["loss_kwargs"]
    ).double()
    load_into(loss_fn, shard)
    result = _step(loss_fn, rank, world_size, cases.NUM_CLASSES, torch.float64)
    torch.save(result, out / f"resharded_{rank}.pt")


def retrieval(rank: int, world_size: int, out: pathlib.Path) -> None:
    """Sharded exact k-nn (continuous and tie-heavy data) and the sharded calculator."""
    data = cases.retrieval_data()
    result: dict[Any, Any] = {}
    for name, (q, r) in {
        "random": (data["q"], data["r"]),
        "ties": (data["qi"], data["ri"]),
        "offset": (data["q"] + 1000, data["r"] + 1000),
    }.items():
        start, end = shard_range(len(r), world_size, rank)
        for metric, exclude_self, k in cases.KNN_CASES:
            result[name, metric, exclude_self, k] = sharded_exact_knn(
                q, r[start:end], k, metric=metric, exclude_self=exclude_self, block_rows=4
            )
    for case_id, (kwargs, mode) in cases.CALCULATOR_CASES.items():
        q, ql, r, rl, ref_includes_query = cases.calculator_inputs(mode)
        start, end = shard_range(len(r), world_size, rank)
        calc = ShardedRetrievalAccuracyCalculator(**kwargs)
        if mode == "decimals_mixed_dtypes":  # float32 on odd ranks, float64 on even ones
            rl = rl if rank % 2 else rl.double()
        labels = cases.rank_labels(rl[start:end], mode, rank)
        if mode.startswith("self"):  # each rank passes its slice of one set
            result[case_id] = calc.get_accuracy(r[start:end], labels)
        else:
            result[case_id] = calc.get_accuracy(
                q, ql, r[start:end], labels, ref_includes_query=ref_includes_query
            )
    torch.save(result, out / f"retrieval_{rank}.pt")


def circle(rank: int, world_size: int, out: pathlib.Path) -> None:
    """CircleLoss (PML's, and ours where present) under PML's DistributedLossWrapper.

    The wrapper needs equal batch sizes on every rank.
    """
    x, y = cases.batch(world_size, 3, seed=5, equal=True)
    part = cases.rows(world_size, rank, equal=True)
    result = {}
    for name, loss_type in cases.circle_losses().items():
        x_local = x[part].clone().requires_grad_(True)
        loss = DistributedLossWrapper(loss_type(m=0.4, gamma=80))(x_local, y[part])
        loss.backward()
        result[name] = {"loss": loss.detach(), "x_grad": x_local.grad}
    torch.save(result, out / f"circle_{rank}.pt")


def ddp_backbone(rank: int, world_size: int, out: pathlib.Path) -> None:
    """A DDP-wrapped backbone feeding the sharded loss: the documented 1/world_size."""
    from torch.nn.parallel import DistributedDataParallel

    backbone = cases.backbone()
    ddp = DistributedDataParallel(backbone)
    loss_fn = _sharded_from_reference("arcface", rank, world_size, cases.NUM_CLASSES, torch.float64)
    features, y = cases.backbone_batch(world_size)
    part = cases.rows(world_size, rank)
    loss_fn(ddp(features[part]), y[part]).backward()
    torch.save({"weight_grad": backbone.weight.grad}, out / f"ddp_{rank}.pt")


def bad_input_on_one_rank(rank: int, world_size: int, out: pathlib.Path) -> None:
    """Bad input on one rank: every rank must raise (none left waiting in a collective).
    Records each rank's error message per case."""
    from pytorch_metric_learning.reducers import (
        MeanReducer,
        PerAnchorReducer,
        SumReducer,
        ThresholdReducer,
    )

    from pml_margins.distributed import (
        ShardedMarginSoftmaxLoss,
        ShardedRetrievalAccuracyCalculator,
        sharded_exact_knn,
    )
    from pml_margins.losses import AdaCosLoss, CurricularFaceLoss, SoftmaxLoss

    loss_fn = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4)
    x, y = torch.randn(3, 4), torch.tensor([0, 4, 9])
    bad = {
        "nan": (x.clone().fill_(float("nan")), y),
        "label": (x, torch.tensor([0, 4, 10])),
        "width": (torch.randn(3, 5), y),
        "dtype": (x.double(), y),
    }
    seen: dict[str, str] = {}
    for case, (bx, by) in bad.items():
        try:
            loss_fn(bx if rank == 1 else x, by if rank == 1 else y)
            seen[case] = "no error"
        except (TypeError, ValueError) as err:
            seen[case] = str(err)
    sampled = ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, sample_rate=0.5)
    if rank == 1:  # a sampler state that fits no CPU generator (a CUDA one's): the other
        sampled.load_sampler_state(torch.zeros(16, dtype=torch.uint8))  # ranks waited (review)
    try:
        sampled(x, y)
        seen["sampler_state"] = "no error"
    except ValueError as err:
        seen["sampler_state"] = str(err)
    for case, shard in {  # the sizes' all-gather waited for the rank that raised
        "knn_nan": torch.full((5, 4), float("nan")),
        "knn_width": torch.randn(5, 3),
    }.items():
        try:
            sharded_exact_knn(torch.randn(3, 4), shard if rank == 1 else torch.randn(5, 4), 2)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    query = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))  # every rank's
    shard = torch.randn(5, 4)
    for case, kwargs in {  # one rank's own arguments: a hang or an abort (review)
        "knn_k_invalid": {"k": -1 if rank == 1 else 2},
        "knn_k_differs": {"k": 3 if rank == 1 else 2},
        "knn_metric": {"k": 2, "metric": "bogus" if rank == 1 else "euclidean"},
        "knn_threads": {"k": 2, "num_threads": -3 if rank == 1 else None},
    }.items():
        try:
            sharded_exact_knn(query, shard, **kwargs)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    labels = torch.tensor([0, 1, 0])
    for case, (calc_kw, call_kw, rows) in {
        "calc_ref_includes_query": ({}, {"ref_includes_query": rank == 1}, 3),
        "calc_k": ({"k": 3 if rank == 1 else 2}, {}, 3),
        "calc_rows": ({}, {}, 2 if rank == 1 else 3),
        # a user's label comparison on one rank: each rank returned its own metrics (review)
        "calc_comparison": (
            {"label_comparison_fn": (lambda a, b: a == b) if rank == 1 else None},
            {},
            3,
        ),
    }.items():
        calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1",), **calc_kw)
        try:
            refs = torch.cat([query[:rows], torch.randn(2, 4)]) if rank == 0 else query[:0]
            refs = refs if rank == 0 else torch.randn(2, 4)
            ref_labels = torch.zeros(len(refs), dtype=torch.long)
            ref_labels[: min(rows, len(refs))] = labels[: min(rows, len(refs))]
            calc.get_accuracy(query[:rows], labels[:rows], refs, ref_labels, **call_kw)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    same = lambda a, b: a == b  # noqa: E731  # labels then keep their dtype
    one_label = labels[:1].repeat(5)  # (int64 / float64 on different ranks: one dtype now)
    layouts = {  # gathered as bytes: an abort, or each rank its own metrics (review)
        "calc_label_dtypes": (
            {"k": 2, "label_comparison_fn": same},
            (query, labels, shard, torch.stack([one_label] * 2, 1) if rank else one_label),
        ),
        "calc_self_dtypes": ({}, (shard.double() if rank == 1 else shard, labels[:1].repeat(5))),
    }
    layouts["calc_own_metric_dtypes"] = (
        {"_cls": _WithOwnMetric},
        (query, labels, shard.double() if rank == 1 else shard, labels[:1].repeat(5)),
    )
    for case, (calc_kw, args) in layouts.items():
        cls = calc_kw.pop("_cls", ShardedRetrievalAccuracyCalculator)
        include = (
            ("precision_at_1", "reference_sum")
            if cls is not ShardedRetrievalAccuracyCalculator
            else ("precision_at_1",)
        )
        calc = cls(include=include, **calc_kw)
        try:
            calc.get_accuracy(*args)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    # each rank its own query set (its slice, say): each ranked its own queries and counted
    # with its own labels, P@1 0.3 on every rank where each one's alone gives 0.2 (review)
    mine = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
    # one coordinate of one of 3,000 x 64 queries 0.1 apart: one summary of the whole set
    # took it for rounding (relative 5e-7); each rank ranked its own (found by review)
    many = torch.randn(3000, 64, generator=torch.Generator().manual_seed(11))
    many[1234, 7] += 0.1 * rank
    many_labels = torch.arange(3000) % 7
    for case, args in {
        "calc_query_values": (mine, labels, shard, labels[:1].repeat(5)),
        "calc_one_query_coordinate": (many, many_labels, many[:5] + rank, labels[:1].repeat(5)),
        "calc_query_labels": (query, (labels + rank) % 2, shard, labels[:1].repeat(5)),
        # ulp-level differences (a model recomputed on each rank): the same query set
        "calc_query_rounding": (query * (1 + rank * 2**-23), labels, shard, labels[:1].repeat(5)),
    }.items():
        calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1",))
        try:
            calc.get_accuracy(*args)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    try:
        sharded_exact_knn(mine, shard, 2)
        seen["knn_query_values"] = "no error"
    except ValueError as err:
        seen["knn_query_values"] = str(err)
    try:  # the shards' dtypes may differ (each ranks its own in float64): not refused
        got = sharded_exact_knn(query, shard.double() if rank == 1 else shard, 2)
        seen["knn_dtype"] = "no error" if got[0].dtype == torch.float32 else str(got[0].dtype)
    except ValueError as err:
        seen["knn_dtype"] = str(err)
    try:  # the query's dtype decides the values' dtype: refused
        sharded_exact_knn(query.double() if rank == 1 else query, shard, 2)
        seen["knn_query_dtype"] = "no error"
    except ValueError as err:
        seen["knn_query_dtype"] = str(err)
    try:  # rank 0 holds no reference: an empty slice
        calc = ShardedRetrievalAccuracyCalculator(include=("precision_at_1",))
        refs = torch.randn(0 if rank == 0 else 4, 4)
        calc.get_accuracy(x, y, refs, torch.zeros(len(refs), dtype=torch.long))
        seen["empty_reference"] = "no error"
    except ValueError as err:
        seen["empty_reference"] = str(err)
    try:  # every rank claims to be shard 0 of 1 inside a group of world_size
        ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, rank=0, world_size=1)(x, y)
        seen["override"] = "no error"
    except ValueError as err:
        seen["override"] = str(err)
    mismatched = {  # rank 1 built or called differently: a wrong loss or a hung backward
        "num_classes": (ShardedMarginSoftmaxLoss(ArcFaceLoss, 11 if rank == 1 else 10, 4), x),
        "sample_rate": (
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, sample_rate=0.5 if rank == 1 else 1.0),
            x,
        ),
        "grad": (loss_fn, x.clone().requires_grad_(rank == 1)),
        # eval mode skips AdaCos's all-reduced scale update (hung); a float64 shard among
        # float32 ones (gloo's size mismatch killed a rank)
        "training modes": (ShardedMarginSoftmaxLoss(AdaCosLoss, 10, 4).train(rank != 1), x),
        "W dtypes": (
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4).to(
                torch.float64 if rank == 1 else torch.float32
            ),
            x,
        ),
        "collect_stats": (_collecting(ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4), rank), x),
        # one rank refused a non-finite loss, the other went into the backward (an abort)
        "value checks": (_checks_on(ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4), rank != 1), x),
        # another loss or hyper-parameter (a review found aborts and different values)
        "loss_class": (
            ShardedMarginSoftmaxLoss(CurricularFaceLoss if rank == 1 else ArcFaceLoss, 10, 4),
            x,
        ),
        "loss_dynamic": (ShardedMarginSoftmaxLoss(AdaCosLoss, 10, 4, dynamic=rank != 1), x),
        "loss_margin": (
            ShardedMarginSoftmaxLoss(ArcFaceLoss, 10, 4, margin=0.3 if rank == 1 else 0.5),
            x,
        ),
        # each rank's reducer: another value per rank, inconsistent gradients (review)
        "loss_reducer": (
            ShardedMarginSoftmaxLoss(
                ArcFaceLoss, 10, 4, reducer=SumReducer() if rank == 1 else MeanReducer()
            ),
            x,
        ),
        "loss_bias": (ShardedMarginSoftmaxLoss(SoftmaxLoss, 10, 4, bias=rank == 1), x),
        # each rank's distance formed its own classes' logits: a mixed loss (review)
        "loss_distance": (
            ShardedMarginSoftmaxLoss(
                ArcFaceLoss, 10, 4, distance=CosineSimilarity(p=3 if rank == 1 else 2)
            ),
            x,
        ),
        # AdaCos's fixed scale and a running statistic are buffers, not hyper-parameters
        "buffers_scale": (
            ShardedMarginSoftmaxLoss(AdaCosLoss, 10, 4, dynamic=False, scale=20.0 + rank),
            x,
        ),
        "buffers_t": (_with_t(ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4), rank), x),
        "buffers_nan": (
            _with_t(ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4), rank, float("nan")),
            x,
        ),
        # a scalar buffer made 1-D on one rank: the all-reduce's sizes differed (abort)
        "buffers_shape": (
            _reshaped_t(ShardedMarginSoftmaxLoss(CurricularFaceLoss, 10, 4), rank),
            x,
        ),
        # a wrapped reducer that differs (PerAnchorReducer's own)
        "loss_inner_reducer": (
            ShardedMarginSoftmaxLoss(
                ArcFaceLoss,
                10,
                4,
                reducer=PerAnchorReducer(SumReducer() if rank else MeanReducer()),
            ),
            x,
        ),
    }
    agreeing = {  # the same settings written differently, and per-class (shard) buffers
        "same_reducer_bounds": ShardedMarginSoftmaxLoss(
            ArcFaceLoss, 10, 4, reducer=ThresholdReducer(low=0 if rank else 0.0)
        ),
        "per_class_buffers": ShardedMarginSoftmaxLoss(PerClassCounts, 11, 4),
    }
    for case, fn in agreeing.items():
        try:
            for _ in range(2):
                fn(x, y)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    for case, (fn, bx) in mismatched.items():
        try:
            fn(bx, y)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    miner = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    for case, extra in {  # refused on rank 1 only: the others stop too, not wait
        "miner": {"indices_tuple": miner},
        "ref_emb": {"ref_emb": x.clone(), "ref_labels": y},
    }.items():
        try:
            loss_fn(x, y, **(extra if rank == 1 else {}))
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    from pml_margins.distributed import sharded_margin_softmax_cross_entropy

    logits = torch.randn(2, 3)
    functional = {  # the public function, called with bad targets
        "functional_range": (logits, torch.tensor([0, -5 if rank == 1 else -1])),
        "functional_owners": (logits, torch.tensor([0, -1])),  # row 0: every rank; 1: none
        "functional_rows": (
            torch.randn(3 if rank == 1 else 2, 3),
            torch.tensor([0, -1, -1] if rank == 1 else [0, -1]),
        ),
        "functional_dtype": (logits.double() if rank == 1 else logits, torch.tensor([0, -1])),
        "functional_scale": (logits, torch.tensor([0, -1])),
        "functional_scale_value": (logits, torch.tensor([0, -1])),
        "functional_scale_written": (
            logits,
            torch.tensor([[0, -1], [-1, 0]][rank] if rank < 2 else [-1, -1]),
        ),
        "functional_value_checks": (logits, torch.tensor([0, -1] if rank == 0 else [-1, 0])),
    }
    for case, (z, target) in functional.items():
        scale = torch.ones(3) if case == "functional_scale" and rank == 1 else 10.0
        scale = 11.0 if case == "functional_scale_value" and rank == 1 else scale
        scale = (10 if rank else 10.0) if case == "functional_scale_written" else scale
        switched = case == "functional_value_checks" and rank == 1
        try:
            with pml_margins.value_checks(not switched):
                sharded_margin_softmax_cross_entropy(z, target, None, scale)
            seen[case] = "no error"
        except ValueError as err:
            seen[case] = str(err)
    torch.save(seen, out / f"bad_input_{rank}.pt")


class _WithOwnMetric(ShardedRetrievalAccuracyCalculator):
    """A subclass's own metric, which reads the (gathered) reference set."""

    def calculate_reference_sum(self, reference, **kwargs):
        return float(reference.sum())

    def requires_knn(self):
        return [*super().requires_knn(), "reference_sum"]


class PerClassCounts(ArcFaceLoss):
    """ArcFace with a per-class buffer of this shard's classes (the extension point's
    per-class state): its size and values differ between ranks."""

    def __init__(self, num_classes: int, embedding_size: int, **kwargs) -> None:
        super().__init__(num_classes, embedding_size, **kwargs)
        self.register_buffer("hits", torch.zeros(num_classes))

    @contextlib.contextmanager
    def prepare_step(self, embeddings, labels, statistics):
        target = statistics.target
        owned = target[target >= 0]
        self.hits += torch.bincount(owned, minlength=self.hits.numel()).float()
        yield


def _with_t(loss, rank: int, value: float = 0.5):
    """CurricularFace with rank 1's running ``t`` loaded from elsewhere."""
    if rank == 1:
        loss.loss.t.fill_(value)
    return loss


def _checks_on(loss, on: bool):
    """``loss`` called with the value checks on or off."""

    def call(x, y):
        with pml_margins.value_checks(on):
            return loss(x, y)

    return call


def _reshaped_t(loss, rank: int):
    """CurricularFace whose ``t`` rank 1 replaced by a 1-element vector (past the
    statistic's setter, which keeps its shape)."""
    if rank == 1:
        loss.loss._buffers["t"] = torch.zeros(1)
    return loss


def _collecting(loss, rank: int):
    """``loss`` with PML's statistics collected on rank 1 only."""
    loss.loss.collect_stats = rank == 1
    return loss


def elastic_draws(rank: int, world_size: int, out: pathlib.Path) -> None:
    """ElasticFace sharded with a seed per rank (as data pipelines often seed): every rank
    uses its group's first rank's margins; they were each rank's own (a mixed loss)."""
    from pml_margins.distributed import (
        ShardedMarginSoftmaxLoss,
        from_single_process_loss,
        load_into,
        split_checkpoint,
    )
    from pml_margins.losses import ElasticFaceLoss

    torch.manual_seed(0)
    single = ElasticFaceLoss(10, 4, sigma=0.3, scale=32.0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * world_size, 4, generator=g, dtype=torch.float64)
    y = torch.arange(2 * world_size) * 10 // (2 * world_size)  # rows on every shard
    sharded = ShardedMarginSoftmaxLoss(ElasticFaceLoss, 10, 4, sigma=0.3, scale=32.0).double()
    load_into(sharded, split_checkpoint(from_single_process_loss(single), world_size)[rank])
    torch.manual_seed(100 + rank)
    mine = slice(2 * rank, 2 * rank + 2)
    value = sharded(x[mine], y[mine]).detach()
    torch.manual_seed(100)  # the first rank's seed
    expected = single(x, y).detach()
    result = {"value": value, "expected": expected, "margins": sharded.loss.last_margins}
    torch.save(result, out / f"elastic_{rank}.pt")


def all_scenarios(
    rank: int, world_size: int, out: pathlib.Path, load_from: str | None = None
) -> None:
    """One process group, every scenario (spawning is the slow part on a small CPU box)."""
    bad_input_on_one_rank(rank, world_size, out)
    losses(rank, world_size, out)
    sampled(rank, world_size, out)
    checkpoint(rank, world_size, out, load_from)
    retrieval(rank, world_size, out)
    circle(rank, world_size, out)
    ddp_backbone(rank, world_size, out)
    elastic_draws(rank, world_size, out)


def fail_on_rank_1(rank: int, world_size: int, out: pathlib.Path) -> None:
    """Rank 1 raises; the others block in a collective that can never complete."""
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    torch.distributed.barrier()
