"""PML trainers and testers: the optimizer/scheduler dicts they expect, and a retrieval tester.

PML's trainers (``MetricLossOnly``, ``TrainWithClassifier``, ...) look optimizers
up by key ``<name>_optimizer`` and schedulers by ``<name>_scheduler_by_<step>``,
where ``<name>`` is a key of ``models`` or ``loss_funcs``. A loss with class
weights (ArcFace & co.) therefore needs a ``metric_loss_optimizer``: without one
its weights never move, and with a misspelt key PML stops on an ``AssertionError``
deep inside its key checker. :func:`trainer_optimizers` builds both dicts from
the models and losses themselves.

Example:
    >>> import torch
    >>> from pml_margins.losses import ArcFaceLoss
    >>> models = {"trunk": torch.nn.Linear(64, 16)}
    >>> loss_funcs = {"metric_loss": ArcFaceLoss(num_classes=10, embedding_size=16)}
    >>> opt = trainer_optimizers(models, loss_funcs, lr=1e-3, loss_lr=1e-2)
    >>> sorted(opt.optimizers)
    ['metric_loss_optimizer', 'trunk_optimizer']
    >>> # MetricLossOnly(models=models, loss_funcs=loss_funcs, optimizers=opt.optimizers,
    >>> #                lr_schedulers=opt.lr_schedulers, batch_size=64, dataset=train_set)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_margins.adapters.retrieval import retrieval_calculator
from pml_margins.validation import check_positive

__all__ = [
    "LOSS_KEYS",
    "MODEL_KEYS",
    "NUMBERED_LOSS_KEY",
    "NUMBERED_MODEL_KEY",
    "SCHEDULER_STEPS",
    "TrainerOptimizers",
    "retrieval_tester",
    "trainer_optimizers",
]

#: keys PML's trainers accept in ``models`` (``classifier`` in ``TrainWithClassifier``;
#: ``generator`` in ``DeepAdversarialMetricLearning``; ``classifier_<i>`` in
#: ``CascadedEmbeddings``, matched by :data:`NUMBERED_MODEL_KEY`)
MODEL_KEYS: tuple[str, ...] = ("trunk", "embedder", "classifier", "generator")
#: keys PML's trainers accept in ``loss_funcs`` (``synth_loss``, ``g_adv_loss``: the
#: adversarial trainer; ``metric_loss_<i>``, ``classifier_loss_<i>``: the cascaded one,
#: matched by :data:`NUMBERED_LOSS_KEY`)
LOSS_KEYS: tuple[str, ...] = ("metric_loss", "classifier_loss", "synth_loss", "g_adv_loss")
#: ``CascadedEmbeddings``' numbered keys in ``models``: ``classifier_0``, ...
NUMBERED_MODEL_KEY = re.compile(r"classifier_[0-9]+")
#: ``CascadedEmbeddings``' numbered keys in ``loss_funcs``: ``metric_loss_1``,
#: ``classifier_loss_1``, ...
NUMBERED_LOSS_KEY = re.compile(r"(metric_loss|classifier_loss)_[0-9]+")
#: when PML steps a scheduler: key suffix ``_scheduler_by_<step>``
SCHEDULER_STEPS: tuple[str, ...] = ("iteration", "epoch", "plateau")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class TrainerOptimizers(NamedTuple):
    """The two dicts a PML trainer takes as ``optimizers`` and ``lr_schedulers``."""

    optimizers: dict[str, torch.optim.Optimizer]
    lr_schedulers: dict[str, Any]


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _check_keys(
    given: Iterable[str], allowed: Sequence[str], numbered: re.Pattern[str], what: str
) -> None:
    unknown = sorted(k for k in set(given) - set(allowed) if not numbered.fullmatch(k))
    if unknown:
        example = "classifier_0" if numbered is NUMBERED_MODEL_KEY else "metric_loss_0"
        raise ValueError(
            f"{what} keys must be among {list(allowed)} or CascadedEmbeddings' numbered "
            f"ones (e.g. {example}; PML's trainers look them up by name), got {unknown}"
        )


def trainer_optimizers(
    models: Mapping[str, torch.nn.Module],
    loss_funcs: Mapping[str, torch.nn.Module],
    *,
    optimizer: OptimizerFactory = torch.optim.Adam,
    lr: float = 1e-3,
    loss_lr: float | None = None,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    scheduler: SchedulerFactory | None = None,
    scheduler_step: str = "epoch",
) -> TrainerOptimizers:
    """Build the ``optimizers`` and ``lr_schedulers`` dicts of a PML trainer.

    Every model and loss with trainable parameters gets its own optimizer under
    ``<key>_optimizer``: the class weights ``W`` of our class-weight losses land in
    ``metric_loss_optimizer``. Modules without trainable parameters (an identity
    embedder, ``CrossEntropyLoss``) get none.

    Args:
        models: PML's ``models`` dict (``trunk`` required; ``embedder``, ``classifier``).
        loss_funcs: PML's ``loss_funcs`` dict (``metric_loss``, ``classifier_loss``).
        optimizer: called as ``optimizer(params, lr=..., **optimizer_kwargs)``.
        lr: learning rate of the models.
        loss_lr: learning rate of the losses' parameters (class weights, which often
            want a larger one); default ``lr``.
        optimizer_kwargs: further arguments of every optimizer (``weight_decay``, ...).
        scheduler: called with each optimizer to build its LR scheduler; ``None``: none.
        scheduler_step: when PML steps the schedulers: ``"iteration"``, ``"epoch"`` or
            ``"plateau"`` (PML calls ``step(validation_info)`` on the latter).

    Returns:
        :class:`TrainerOptimizers` ``(optimizers, lr_schedulers)``.

    Raises:
        ValueError: a key PML does not know, no ``trunk``, a non-positive learning
            rate, an unknown ``scheduler_step``, or a parameter under two keys.
    """
    _check_keys(models, MODEL_KEYS, NUMBERED_MODEL_KEY, "models")
    _check_keys(loss_funcs, LOSS_KEYS, NUMBERED_LOSS_KEY, "loss_funcs")
    if "trunk" not in models:
        raise ValueError("models must contain a 'trunk' (PML's trainers require it)")
    if scheduler_step not in SCHEDULER_STEPS:
        raise ValueError(
            f"scheduler_step must be one of {list(SCHEDULER_STEPS)}, got {scheduler_step!r}"
        )
    lr = check_positive(lr, "lr")
    loss_lr = lr if loss_lr is None else check_positive(loss_lr, "loss_lr")
    kwargs = dict(optimizer_kwargs or {})

    optimizers: dict[str, torch.optim.Optimizer] = {}
    owners: dict[int, str] = {}  # id of a parameter -> the key whose optimizer holds it
    for group, rate in ((models, lr), (loss_funcs, loss_lr)):
        for name, module in group.items():
            params = _trainable(module)
            for param in params:
                other = owners.setdefault(id(param), name)
                if other != name:
                    raise ValueError(
                        f"{name} and {other} share parameters (the same module under two "
                        "keys?): PML would step them twice an iteration, with two "
                        "optimizers' states; give each module once"
                    )
            if params:
                optimizers[f"{name}_optimizer"] = optimizer(params, lr=rate, **kwargs)
    lr_schedulers: dict[str, Any] = {}
    if scheduler is not None:
        for key, opt in optimizers.items():
            name = key.removesuffix("_optimizer")
            lr_schedulers[f"{name}_scheduler_by_{scheduler_step}"] = scheduler(opt)
    return TrainerOptimizers(optimizers, lr_schedulers)


def retrieval_tester(
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    include: Sequence[str] | None = None,
    k: int | str | None = None,
    accuracy_calculator: AccuracyCalculator | None = None,
    batch_size: int = 256,
    dataloader_num_workers: int = 0,
    **tester_kwargs: Any,
) -> GlobalEmbeddingSpaceTester:
    """PML's ``GlobalEmbeddingSpaceTester`` with our exact retrieval metrics (no faiss-gpu).

    ``tester.test(dataset_dict, epoch, trunk, embedder)`` then returns, per split,
    ``recall_at_1_level0``, ``precision_at_1_level0``, ``r_precision_level0``,
    ``mean_average_precision_at_r_level0``, ... (PML appends the label level).

    Args:
        recall_ks, include, k: passed to :func:`~pml_margins.adapters.retrieval_calculator`.
        accuracy_calculator: use this calculator instead (then ``recall_ks``, ``include``
            and ``k`` are ignored).
        batch_size, dataloader_num_workers: of the tester's evaluation dataloader.
        **tester_kwargs: any other ``GlobalEmbeddingSpaceTester`` argument
            (``normalize_embeddings``, ``data_device``, ``end_of_testing_hook``, ...).
    """
    if accuracy_calculator is None:
        accuracy_calculator = retrieval_calculator(recall_ks=recall_ks, include=include, k=k)
    return GlobalEmbeddingSpaceTester(
        accuracy_calculator=accuracy_calculator,
        batch_size=batch_size,
        dataloader_num_workers=dataloader_num_workers,
        **tester_kwargs,
    )
