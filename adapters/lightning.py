"""PyTorch Lightning: a metric-learning ``LightningModule`` and a retrieval-metrics callback.

Needs ``pip install 'pml-margins[lightning]'``.

Example::

    module = MetricLearningModule(backbone, ArcFaceLoss(10, 32), lr=1e-3, loss_lr=1e-2)
    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[RetrievalMetricsCallback()])
    trainer.fit(module, train_loader, val_loader)
    trainer.callback_metrics["recall_at_1"], trainer.callback_metrics["map_at_r"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pml_margins.adapters._extras import require
from pml_margins.adapters.retrieval import retrieval_calculator
from pml_margins.evaluation.inputs import check_int
from pml_margins.validation import check_bool, check_non_negative, check_positive

pl = require("lightning.pytorch", extra="lightning")

__all__ = ["METRIC_NAMES", "MetricLearningModule", "RetrievalMetricsCallback"]

#: short names under which the callback logs the calculator's metrics (others keep theirs)
METRIC_NAMES: dict[str, str] = {"mean_average_precision_at_r": "map_at_r"}


_BATCH_FORMS = "batches must be (inputs, labels, ...) sequences or {'input', 'label'} mappings"


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of a batch; one-column labels ``(B, 1)`` as ``(B,)``."""
    if isinstance(batch, Mapping):
        missing = [k for k in ("input", "label") if k not in batch]
        if missing:
            keys = ", ".join(repr(k) for k in batch)
            raise TypeError(f"{_BATCH_FORMS}; this mapping has no {missing!r} (its keys: {keys})")
        return batch["input"], _one_column(batch["label"])
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], _one_column(batch[1])
    raise TypeError(f"{_BATCH_FORMS}, got {type(batch).__name__}")


def _one_column(labels: Any) -> Any:
    """``(B, 1)`` labels (a label column) as ``(B,)``; ``(B, L)`` ones, for a calculator's
    ``label_comparison_fn``, as they are."""
    if isinstance(labels, torch.Tensor) and labels.ndim == 2 and labels.shape[1] == 1:
        return labels.reshape(-1)
    return labels


def _check_callables(**values: Any) -> None:
    """``TypeError`` naming each argument that is neither ``None`` nor callable
    (``optimizer="adam"`` failed at fit time); ``None`` is refused for the optimizer
    only (a backbone set after ``super().__init__``, no loss for evaluation alone, no
    miner or scheduler are fine)."""
    for name, value in values.items():
        if value is None and name != "optimizer":
            continue
        if not callable(value):
            raise TypeError(f"{name} must be callable, got {type(value).__name__}")


class MetricLearningModule(pl.LightningModule):
    """Train a backbone with one of our losses (or any PML loss), optionally with a PML miner.

    ``training_step`` embeds the batch, mines it when a ``miner`` is given and logs
    ``train_loss``. ``validation_step`` and ``test_step`` only return
    ``{"embeddings", "labels"}`` for :class:`RetrievalMetricsCallback` (evaluation
    classes may be unseen in training, so no loss is computed there):
    ``trainer.validate`` and ``trainer.test`` give the retrieval metrics of a loader,
    ``trainer.predict`` its embeddings (``predict_step``). The
    optimizer gets two parameter groups: the backbone (``lr``, ``weight_decay``) and
    the loss's own parameters, e.g. the class weights ``W`` of ArcFace (``loss_lr``, no
    weight decay: the cosine losses do not depend on the norm of ``W``). Several
    validation dataloaders are fine: one :class:`RetrievalMetricsCallback` per ``dataloader_idx``.

    Args:
        backbone: maps a batch of inputs to ``(B, D)`` embeddings.
        loss: a PML loss called as ``loss(embeddings, labels, indices_tuple)``.
        miner: a PML miner whose ``indices_tuple`` the loss receives; ``None``: none.
        lr: learning rate of the backbone.
        loss_lr: learning rate of the loss's parameters; default ``lr``.
        weight_decay: weight decay of the backbone; ``None`` (default): the
            optimizer's own (``optimizer=partial(SGD, weight_decay=5e-4)``, AdamW's 0.01).
        optimizer: called as ``optimizer(param_groups, lr=lr)``.
        scheduler: called with the optimizer to build a scheduler stepped every epoch,
            or Lightning's scheduler dict: one that watches a metric (``ReduceLROnPlateau``)
            needs the dict, ``lambda o: {"scheduler": ReduceLROnPlateau(o, mode="max"),
            "monitor": "map_at_r"}`` (the name :class:`RetrievalMetricsCallback` logs,
            with its ``prefix``).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        loss: torch.nn.Module,
        miner: torch.nn.Module | None = None,
        *,
        lr: float = 1e-3,
        loss_lr: float | None = None,
        weight_decay: float | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        _check_callables(
            backbone=backbone, loss=loss, miner=miner, optimizer=optimizer, scheduler=scheduler
        )
        self.backbone, self.loss, self.miner = backbone, loss, miner
        self.lr = check_positive(lr, "lr")
        self.loss_lr = self.lr if loss_lr is None else check_positive(loss_lr, "loss_lr")
        self.weight_decay = (
            None if weight_decay is None else check_non_negative(weight_decay, "weight_decay")
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.save_hyperparameters("lr", "loss_lr", "weight_decay")

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.backbone(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, labels = _split_batch(batch)
        embeddings = self(inputs)
        indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
        loss = self.loss(embeddings, labels, indices_tuple)
        self.log(
            "train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels)
        )
        return loss

    def validation_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        inputs, labels = _split_batch(batch)
        return {"embeddings": self(inputs), "labels": labels}

    def test_step(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """As :meth:`validation_step`: ``trainer.test`` with the callback gives the test
        set's retrieval metrics."""
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The batch's ``(B, D)`` embeddings (``trainer.predict``), from the loaders that
        ``fit`` and ``validate`` take, or from a batch of inputs alone: a tensor, a
        one-element sequence (a ``TensorDataset`` of inputs gives ``[x]``) or a mapping
        with an ``"input"`` and no ``"label"`` (prediction needs no labels)."""
        if isinstance(batch, Mapping) and "input" in batch and "label" not in batch:
            inputs = batch["input"]
        elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 1:
            inputs = batch[0]
        else:
            inputs = batch if isinstance(batch, torch.Tensor) else _split_batch(batch)[0]
        return self(inputs)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: ``backbone`` and ``loss`` (empty ones left out)."""
        groups = [
            {"name": "backbone", "params": self.backbone.parameters(), "lr": self.lr},
            {
                "name": "loss",
                "params": self.loss.parameters(),
                "lr": self.loss_lr,
                "weight_decay": 0.0,
            },
        ]
        if self.weight_decay is not None:  # else the optimizer's own
            groups[0]["weight_decay"] = self.weight_decay
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups(), lr=self.lr)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


def _merge_ranks(
    gathered: torch.Tensor, sizes: Sequence[int], num_samples: int | None = None
) -> torch.Tensor:
    """Undo the split of a validation set over ``W`` ranks.

    Args:
        gathered: ``(W, n, ...)``: each rank's rows, padded to a common ``n``.
        sizes: how many rows of each rank are real.
        num_samples: the dataset's length when the ranks were fed by a
            ``DistributedSampler``, which deals the ``i``-th index of its list (the
            dataset's order, or a shuffled one) to rank ``i % W`` and pads the list's
            end with copies of its first indices; then the list's order is restored
            and the copies, its last entries, are dropped (a copy of a query among the
            references would be a perfect false neighbour; shuffled or not).
            ``None``: the ranks' rows are concatenated as they are.

    Returns:
        ``(N, ...)`` rows.
    """
    world = gathered.shape[0]
    if len(sizes) != world:
        raise ValueError(f"sizes has {len(sizes)} entries for {world} ranks")
    if num_samples is not None and len(set(sizes)) == 1 and world * sizes[0] >= num_samples:
        per_rank = sizes[0]
        interleaved = (
            gathered[:, :per_rank].transpose(0, 1).reshape(world * per_rank, *gathered.shape[2:])
        )
        return interleaved[:num_samples]
    return torch.cat([gathered[r, : sizes[r]] for r in range(world)])


def _evaluation_loader(trainer: Any, dataloader_idx: int, stage: str = "validate") -> Any:
    """The ``dataloader_idx``-th of the validation (``stage="validate"``) or test
    (``"test"``) loaders in Lightning's own order (a loader, a list, a dict or any nesting
    of them, flattened as its ``CombinedLoader`` does), or ``None``."""
    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    if loaders is None:
        return None
    flattened = pl.utilities.CombinedLoader(loaders, "sequential").flattened
    return flattened[dataloader_idx] if dataloader_idx < len(flattened) else None


def _distributed_num_samples(trainer: Any, dataloader_idx: int, stage: str) -> int | None:
    """The length of the evaluated dataset whose ``DistributedSampler`` padded the
    ranks' shares (``None`` where nothing was padded)."""
    sampler = getattr(_evaluation_loader(trainer, dataloader_idx, stage), "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.drop_last:
        return len(sampler.dataset)
    return None


def _one_set_on_every_rank(rows: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]) -> bool:
    """Whether the ranks' gathered rows ``(W, n, ...)`` are one set on every rank: equal
    counts, equal labels and equal embeddings (to ``allclose``, for kernels that round
    differently). Then every rank evaluated the same rows (a loader Lightning did not
    shard, ``Trainer(use_distributed_sampler=False)``), and merging them would put ``W``
    copies of each in the set, each query's copy a perfect false neighbour. Decided from
    the gathered data, so every rank decides alike."""
    if len(set(sizes)) != 1:
        return False
    n = sizes[0]
    first_rows, first_labels = rows[0, :n].float(), labels[0, :n]
    return all(
        torch.equal(labels[r, :n], first_labels)
        and torch.allclose(rows[r, :n].float(), first_rows, rtol=1e-4, atol=1e-6)
        for r in range(1, rows.shape[0])
    )


class RetrievalMetricsCallback(pl.Callback):
    """Compute our retrieval metrics on the validation set at each validation epoch end
    (and, with ``test=True``, on the test set at the end of ``trainer.test``).

    Every embedding of the validation set is a query against all the others
    (leave-one-out). The callback collects ``{"embeddings", "labels"}`` returned by
    ``validation_step`` (as :class:`MetricLearningModule` does); for any other
    module it embeds ``batch[0]`` with ``pl_module(...)`` and takes ``batch[1]``
    as labels. Under DDP the embeddings of all ranks are gathered (and the
    padding copies of ``DistributedSampler`` dropped) before the metrics are
    computed, identically on every rank; where every rank turns out to hold the same rows
    (a loader Lightning did not shard, ``Trainer(use_distributed_sampler=False)``), one
    copy of them. Logged as ``recall_at_1``, ``recall_at_2``, ..., ``precision_at_1``,
    ``r_precision``, ``map_at_r`` (with ``prefix``); the last values are also in
    :attr:`metrics`.

    Args:
        recall_ks, include, k: passed to :func:`~pml_margins.adapters.retrieval_calculator`.
        accuracy_calculator: use this PML ``AccuracyCalculator`` instead.
        prefix: prepended to every logged name, e.g. ``"val/"``. Two callbacks of a
            trainer (one per validation dataloader) that log a metric in common need
            different prefixes: Lightning would average values logged under one name
            (``ValueError`` at setup).
        dataloader_idx: which validation (or test) dataloader to evaluate
            (``ValueError`` at the epoch's end when there is no such dataloader).
        test: also evaluate ``trainer.test``'s loader (``MetricLearningModule.test_step``
            returns what it needs); off by default, so that a callback made for
            validation leaves a module's own test loop alone.
    """

    def __init__(
        self,
        recall_ks: Sequence[int] = (1, 2, 4, 8),
        include: Sequence[str] | None = None,
        k: int | str | None = None,
        accuracy_calculator: Any = None,
        prefix: str = "",
        dataloader_idx: int = 0,
        test: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.test = check_bool(test, "test")
        self.prefix, self.dataloader_idx = prefix, check_int(dataloader_idx, "dataloader_idx", 0)
        if accuracy_calculator is None:
            accuracy_calculator = retrieval_calculator(recall_ks=recall_ks, include=include, k=k)
        if not callable(getattr(accuracy_calculator, "get_accuracy", None)):
            raise TypeError(
                "accuracy_calculator must be a PML AccuracyCalculator (a get_accuracy "
                f"method), got {type(accuracy_calculator).__name__}"
            )
        if getattr(accuracy_calculator, "return_per_class", False) is True:
            raise ValueError(  # (float() of a list, after the first epoch)
                "the callback logs one number per metric: give a calculator with "
                "return_per_class=False"
            )
        self.calculator = accuracy_calculator
        self.metrics: dict[str, float] = {}
        self._embeddings: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """``ValueError`` when another callback of this trainer logs a name this one does."""
        for other in trainer.callbacks:
            if other is not self and isinstance(other, RetrievalMetricsCallback):
                shared = sorted(self.logged_names() & other.logged_names())
                if shared:
                    raise ValueError(
                        f"two RetrievalMetricsCallbacks (dataloader_idx "
                        f"{other.dataloader_idx} and {self.dataloader_idx}) log {shared}: "
                        "Lightning would log their mean; give each its own prefix"
                    )

    def logged_names(self) -> set[str]:
        """The names this callback logs: ``prefix`` and each metric of its calculator (a
        calculator without PML's metric table: every name under ``prefix``)."""
        metrics = getattr(self.calculator, "original_function_dict", None)
        if not isinstance(metrics, Mapping):
            return {self.prefix + "*"}
        return {self.prefix + METRIC_NAMES.get(name, name) for name in metrics}

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._embeddings, self._labels = [], []

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._embeddings, self._labels = [], []  # (kept empty unless test=True)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._collect(pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.test:
            self._collect(pl_module, outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._evaluate(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.test:
            self._evaluate(trainer, pl_module, "test")

    def _collect(self, pl_module: Any, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        """Keep a batch's embeddings and labels (those the step returned, else embedded here)."""
        if dataloader_idx != self.dataloader_idx:
            return
        if isinstance(outputs, Mapping) and "embeddings" in outputs and "labels" in outputs:
            embeddings, labels = outputs["embeddings"], outputs["labels"]
        else:
            inputs, labels = _split_batch(batch)
            embeddings = pl_module(inputs)
        for name, value in (("embeddings", embeddings), ("labels", labels)):
            if not isinstance(value, torch.Tensor):  # (string class names: a tuple)
                raise TypeError(
                    f"RetrievalMetricsCallback needs the {name} of each batch as a tensor"
                    + (" of class numbers" if name == "labels" else "")
                    + f", got {type(value).__name__}"
                )
        self._embeddings.append(embeddings.detach())
        self._labels.append(_one_column(labels.detach()))

    def _evaluate(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """The metrics of the collected set (gathered over the ranks), logged."""
        loaders = len(trainer.num_test_batches if stage == "test" else trainer.num_val_batches)
        if self.dataloader_idx >= loaders:
            what = "test" if stage == "test" else "validation"
            raise ValueError(
                f"RetrievalMetricsCallback(dataloader_idx={self.dataloader_idx}) but the "
                f"{what} has {loaders} dataloader(s): nothing to evaluate"
            )
        if not self._embeddings:  # (no batches: limit_val_batches=0, say)
            return
        embeddings, labels = torch.cat(self._embeddings), torch.cat(self._labels)
        self._embeddings, self._labels = [], []
        if trainer.world_size > 1:  # the same collectives on every rank, whatever follows
            count = torch.tensor([embeddings.shape[0]], device=embeddings.device)
            sizes = [int(s) for s in pl_module.all_gather(count).reshape(-1)]
            rows = self._gather(pl_module, embeddings, sizes)
            classes = self._gather(pl_module, labels, sizes)
            num_samples = _distributed_num_samples(trainer, self.dataloader_idx, stage)
            if num_samples is not None or not _one_set_on_every_rank(rows, classes, sizes):
                embeddings = _merge_ranks(rows, sizes, num_samples)
                labels = _merge_ranks(classes, sizes, num_samples)
        if embeddings.dtype != torch.float64:  # (half embeddings: float32; float64 kept)
            embeddings = embeddings.float()
        accuracies = self.calculator.get_accuracy(embeddings, labels)
        self.metrics = {
            self.prefix + METRIC_NAMES.get(k, k): float(v) for k, v in accuracies.items()
        }
        for name, value in self.metrics.items():
            pl_module.log(
                name, value, prog_bar=name.endswith("recall_at_1"), sync_dist=trainer.world_size > 1
            )

    @staticmethod
    def _gather(pl_module: Any, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's rows, ``(W, max(sizes), ...)``, each padded with zeros."""
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        return pl_module.all_gather(padded)
