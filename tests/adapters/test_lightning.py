"""The Lightning module and retrieval callback, in real ``Trainer`` runs on the digits."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from tests.adapters.conftest import require_extra

require_extra("lightning", "'pml-margins[lightning]'")

import lightning.pytorch as pl  # noqa: E402
from pytorch_metric_learning.miners import MultiSimilarityMiner  # noqa: E402
from pytorch_metric_learning.samplers import MPerClassSampler  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from pml_margins.adapters import MetricLearningModule, RetrievalMetricsCallback  # noqa: E402
from pml_margins.adapters.lightning import _merge_ranks  # noqa: E402
from pml_margins.losses import ArcFaceLoss, CircleLoss  # noqa: E402
from tests.adapters.conftest import Digits, changed, mlp, params_copy  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used:UserWarning"),
    # lightning 2.6 on torch 2.13 (not our code)
    pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.` is deprecated"),
]

EMB = 32
METRICS = (
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "precision_at_1",
    "r_precision",
    "map_at_r",
)


def arcface() -> ArcFaceLoss:
    return ArcFaceLoss(num_classes=10, embedding_size=EMB, margin=0.3, scale=16.0)


def loaders(digits: Digits) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(digits.train_set(), batch_size=64, shuffle=True)
    return train, DataLoader(digits.test_set(), batch_size=128)


def make_trainer(tmp_path: Path, callback: pl.Callback, **kwargs: object) -> pl.Trainer:
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    return pl.Trainer(**{**options, **kwargs})


def logged_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("run/*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fit_logs_retrieval_metrics_every_epoch(digits: Digits, tmp_path: Path) -> None:
    loss = arcface()
    module = MetricLearningModule(mlp(), loss, lr=1e-3, loss_lr=1e-2, weight_decay=1e-4)
    callback = RetrievalMetricsCallback()
    w_before, backbone_before = loss.W.detach().clone(), params_copy(module.backbone)
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(module, *loaders(digits))

    # separate parameter group for the class weights, with its own learning rate
    (optimizer,) = trainer.optimizers
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["loss"]["params"] == [loss.W]
    assert (groups["loss"]["lr"], groups["loss"]["weight_decay"]) == (1e-2, 0.0)
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (1e-3, 1e-4)
    assert not torch.equal(loss.W.detach(), w_before)
    assert changed(backbone_before, module.backbone)

    # metrics of the last epoch, logged and kept by the callback
    for name in METRICS:
        value = float(trainer.callback_metrics[name])
        assert value == pytest.approx(callback.metrics[name])
        assert 0.0 <= value <= 1.0 and math.isfinite(value)
    assert callback.metrics["recall_at_1"] > 0.85
    assert callback.metrics["recall_at_8"] >= callback.metrics["recall_at_1"]
    # one logged row per epoch (the sanity check before training is not evaluated)
    rows = [r for r in logged_rows(tmp_path) if r.get("map_at_r")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert any(r.get("train_loss_epoch") for r in logged_rows(tmp_path))


def test_fit_with_a_miner_and_a_scheduler(digits: Digits, tmp_path: Path) -> None:
    loss = arcface()
    module = MetricLearningModule(
        mlp(),
        loss,
        MultiSimilarityMiner(epsilon=0.1),
        loss_lr=1e-2,
        optimizer=torch.optim.SGD,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1),
    )
    callback = RetrievalMetricsCallback(prefix="val/")
    w_before = loss.W.detach().clone()
    trainer = make_trainer(tmp_path, callback, max_epochs=1, limit_train_batches=8)
    trainer.fit(module, *loaders(digits))
    assert not torch.equal(loss.W.detach(), w_before)
    assert set(callback.metrics) == {f"val/{m}" for m in METRICS}
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])  # one step


def test_a_plateau_scheduler_watches_the_logged_metric(digits: Digits, tmp_path: Path) -> None:
    """The docstring's dict form: ReduceLROnPlateau on map_at_r (improvements never count
    here, so the second epoch's end cuts every group's rate)."""

    def plateau(optimizer: torch.optim.Optimizer) -> dict:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", patience=0, threshold=10.0, threshold_mode="abs"
        )
        return {"scheduler": scheduler, "monitor": "map_at_r"}

    module = MetricLearningModule(mlp(), arcface(), lr=1e-3, loss_lr=1e-2, scheduler=plateau)
    trainer = make_trainer(tmp_path, RetrievalMetricsCallback(), limit_train_batches=2)
    trainer.fit(module, *loaders(digits))
    (optimizer,) = trainer.optimizers
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])


def test_fit_with_circle_and_a_miner(digits: Digits, tmp_path: Path) -> None:
    sampler = MPerClassSampler(digits.y_train, m=8, batch_size=64, length_before_new_iter=64 * 10)
    train = DataLoader(digits.train_set(), batch_size=64, sampler=sampler)
    module = MetricLearningModule(mlp(), CircleLoss(m=0.25, gamma=64), MultiSimilarityMiner())
    assert [g["name"] for g in module.param_groups()] == ["backbone"]  # no class weights
    backbone_before = params_copy(module.backbone)
    callback = RetrievalMetricsCallback()
    make_trainer(tmp_path, callback, max_epochs=1).fit(module, train, loaders(digits)[1])
    assert changed(backbone_before, module.backbone)
    assert callback.metrics["recall_at_1"] > 0.85


class PlainModule(pl.LightningModule):
    """Any module: its validation_step returns nothing, the callback embeds the batch."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def validation_step(self, batch: object, batch_idx: int) -> None:
        return None


def test_callback_embeds_batches_of_any_module(digits: Digits, tmp_path: Path) -> None:
    backbone = mlp()
    callback = RetrievalMetricsCallback(include=("precision_at_1",))
    trainer = make_trainer(tmp_path, callback)
    trainer.validate(PlainModule(backbone), loaders(digits)[1], verbose=False)

    reference = RetrievalMetricsCallback(include=("precision_at_1",)).calculator
    with torch.no_grad():
        expected = reference.get_accuracy(backbone(digits.x_test), digits.y_test)
    assert callback.metrics == pytest.approx(expected)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("num_samples", "world"), [(10, 3), (9, 3), (7, 2), (4, 4), (2, 3)])
def test_merge_ranks_restores_distributed_sampler_order(
    num_samples: int, world: int, shuffle: bool
) -> None:
    """Each sample once (the padding copies dropped): in the dataset's order, or in the
    sampler's shuffled one."""
    data = torch.arange(num_samples * 2).reshape(num_samples, 2)
    dataset = torch.utils.data.TensorDataset(data)
    samplers = [
        DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=shuffle, seed=5)
        for r in range(world)
    ]
    per_rank = [data[list(sampler)] for sampler in samplers]
    sizes = [len(x) for x in per_rank]
    gathered = torch.stack(per_rank)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_merge_ranks(gathered, sizes, num_samples), data[order] if shuffle else data)
    # without the dataset length: plain concatenation of the real rows
    assert _merge_ranks(gathered, sizes).shape[0] == sum(sizes)


def test_merge_ranks_unequal_sizes() -> None:
    gathered = torch.tensor([[1, 2, 3], [4, 5, 0]])
    assert _merge_ranks(gathered, [3, 2], num_samples=5).tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="ranks"):
        _merge_ranks(gathered, [3])


@pytest.mark.parametrize("given_as", ["loader", "dict", "shuffled"])
def test_ddp_metrics_equal_single_process_metrics(
    digits: Digits, tmp_path: Path, given_as: str
) -> None:
    """Two CPU ranks (gloo): metrics from gathered embeddings equal those of one process.

    61 validation samples over 2 ranks: DistributedSampler pads one copy, which the
    callback must drop (also when the loaders come as a dict: the copy was kept, P@1
    0.1373 where one process gives 0.1188). Without the gather each rank would score
    only its half. A shuffled loader's sampler pads too (P@1 0.7727 of 22 rows where one
    process gives 0.7619 of 21, on a 21-row set: its copy was kept).
    """
    torch.manual_seed(0)
    module = MetricLearningModule(mlp(), arcface())
    val = DataLoader(
        torch.utils.data.TensorDataset(digits.x_test[:61], digits.y_test[:61]), batch_size=16
    )

    single = RetrievalMetricsCallback()
    make_trainer(tmp_path / "single", single).validate(module, val, verbose=False)

    ddp = make_trainer(tmp_path / "ddp", RetrievalMetricsCallback(), devices=2, strategy="ddp_fork")
    if given_as == "shuffled":
        val = DataLoader(val.dataset, batch_size=16, shuffle=True)
    ddp.validate(module, {"digits": val} if given_as == "dict" else val, verbose=False)
    for name, value in single.metrics.items():
        assert float(ddp.callback_metrics[name]) == pytest.approx(value, abs=1e-6), name


def _unsharding_ddp_trainer(tmp_path: Path) -> pl.Trainer:
    """Two CPU ranks (gloo) whose validation loaders Lightning leaves as they are."""
    return make_trainer(
        tmp_path,
        RetrievalMetricsCallback(),
        devices=2,
        strategy="ddp_fork",
        use_distributed_sampler=False,
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_ddp_with_an_unsharded_loader_scores_each_rank_once(
    digits: Digits, tmp_path: Path, shuffle: bool
) -> None:
    """``use_distributed_sampler=False`` with a plain loader: every rank evaluates the
    whole set. Gathered, each row was in it twice, its copy a perfect neighbour (P@1 and
    Recall@K 1.0; MAP@R 0.4937 where one process gives 0.4364 on these 57 rows)."""
    torch.manual_seed(0)
    module = MetricLearningModule(mlp(), arcface())
    val = DataLoader(
        torch.utils.data.TensorDataset(digits.x_test[:57], digits.y_test[:57]),
        batch_size=16,
        shuffle=shuffle,
    )
    single = RetrievalMetricsCallback()
    make_trainer(tmp_path / "single", single).validate(module, val, verbose=False)
    assert single.metrics["precision_at_1"] < 0.99
    ddp = _unsharding_ddp_trainer(tmp_path / "ddp")
    ddp.validate(module, val, verbose=False)
    for name, value in single.metrics.items():
        assert float(ddp.callback_metrics[name]) == pytest.approx(value, abs=1e-6), name


class _ShardedValidation(MetricLearningModule):
    """A module whose validation loader shards the set itself (every other row per rank)."""

    def __init__(self, data, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data, self.mode = data, mode

    def val_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        data = self.data
        if self.mode == "subset":
            return DataLoader(torch.utils.data.Subset(data, range(rank, len(data), world)), 16)

        class Shard(torch.utils.data.IterableDataset):
            def __iter__(self):
                return (data[i] for i in range(rank, len(data), world))

            def __len__(self) -> int:
                return len(range(rank, len(data), world))

        return DataLoader(Shard(), batch_size=16)


@pytest.mark.parametrize("mode", ["subset", "iterable_with_len"])
def test_ddp_with_a_loader_the_user_shards_is_gathered(
    digits: Digits, tmp_path: Path, mode: str
) -> None:
    """``use_distributed_sampler=False`` with shards the loader makes itself: the rows are
    gathered (a version that judged from the loader's sampler scored each rank's half:
    MAP@R 0.4904 where the whole set gives 0.4268; found by review)."""
    torch.manual_seed(0)
    backbone, loss = mlp(), arcface()
    data = torch.utils.data.TensorDataset(digits.x_test[:56], digits.y_test[:56])
    single = RetrievalMetricsCallback()
    make_trainer(tmp_path / "single", single).validate(
        MetricLearningModule(backbone, loss), DataLoader(data, batch_size=16), verbose=False
    )
    ddp = _unsharding_ddp_trainer(tmp_path / "ddp")
    ddp.validate(_ShardedValidation(data, mode, backbone=backbone, loss=loss), verbose=False)
    for name, value in single.metrics.items():
        assert float(ddp.callback_metrics[name]) == pytest.approx(value, abs=1e-6), name


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        MetricLearningModule(mlp(), arcface(), lr=0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        MetricLearningModule(mlp(), arcface(), weight_decay=-1)


def test_batches_as_mappings_and_bad_batches(digits: Digits) -> None:
    module = MetricLearningModule(mlp(), arcface())
    x, y = digits.x_test[:8], digits.y_test[:8]
    out = module.validation_step({"input": x, "label": y}, 0)
    assert out["embeddings"].shape == (8, EMB) and torch.equal(out["labels"], y)
    with pytest.raises(TypeError, match="batches must be"):
        module.validation_step(x, 0)
    # a mapping with other keys (Hugging Face's): the forms, and the keys it has (it was
    # a bare KeyError: 'input')
    for batch, missing in (
        ({"pixel_values": x, "labels": y}, r"\['input', 'label'\]"),
        ({"input": x, "labels": y}, r"\['label'\]"),
    ):
        keys = ", ".join(repr(k) for k in batch)
        with pytest.raises(TypeError, match=rf"batches must .*no {missing} \(its keys: {keys}\)"):
            module.training_step(batch, 0)


def test_predict_gives_the_embeddings_of_the_fit_loaders(digits: Digits, tmp_path: Path) -> None:
    """``trainer.predict`` on the loader ``fit``/``validate`` take (Lightning's default
    ``predict_step`` handed the backbone the ``[inputs, labels]`` list)."""
    module = MetricLearningModule(mlp(), arcface()).eval()
    val = loaders(digits)[1]
    trainer = make_trainer(tmp_path, RetrievalMetricsCallback(), logger=False)
    predicted = torch.cat(trainer.predict(module, val))
    with torch.no_grad():
        expected = module.backbone(digits.x_test)
    assert predicted.shape == (len(digits.x_test), EMB)
    torch.testing.assert_close(predicted, expected)
    x = digits.x_test[:5]  # a batch of inputs alone, and a mapping
    torch.testing.assert_close(module.predict_step(x, 0), module(x))
    torch.testing.assert_close(module.predict_step({"input": x, "label": x[:, 0]}, 0), module(x))
    # inputs without labels: a TensorDataset of inputs ([x]) and a mapping of "input" alone
    unlabelled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2)
    torch.testing.assert_close(torch.cat(trainer.predict(module, unlabelled)), module(x))
    torch.testing.assert_close(module.predict_step({"input": x}, 0), module(x))
    torch.testing.assert_close(module.predict_step((x,), 0), module(x))


def test_training_step_hands_the_miners_pairs_to_the_loss(digits: Digits) -> None:
    """The loss gets the miner's ``indices_tuple`` for the step's own embeddings (no other
    test fails when the miner is dropped)."""
    torch.manual_seed(0)
    miner = MultiSimilarityMiner(epsilon=0.1)
    loss = CircleLoss(gamma=4.0)  # (a large gamma: the hardest pairs, which both keep)
    module = MetricLearningModule(mlp(), loss, miner)
    x, y = digits.x_test[:64], digits.y_test[:64]
    got = module.training_step((x, y), 0)
    embeddings = module(x)
    pairs = miner(embeddings, y)
    assert 0 < len(pairs[0]) < 64 * 63  # the miner keeps some pairs, not all
    torch.testing.assert_close(got, loss(embeddings, y, pairs))
    assert not torch.allclose(got, loss(embeddings, y))


def test_two_validation_dataloaders_one_callback_each(digits: Digits, tmp_path: Path) -> None:
    train, val = loaders(digits)
    half = torch.utils.data.Subset(digits.test_set(), range(0, len(digits.test_set()), 2))
    first = RetrievalMetricsCallback(prefix="a/", dataloader_idx=0)
    second = RetrievalMetricsCallback(prefix="b/", dataloader_idx=1)
    trainer = make_trainer(tmp_path, first, max_epochs=1)
    trainer.callbacks.append(second)
    module = MetricLearningModule(mlp(), arcface(), lr=1e-2)
    trainer.fit(module, train, [val, DataLoader(half, batch_size=128)])
    assert set(first.metrics) == {f"a/{m}" for m in METRICS}
    assert set(second.metrics) == {f"b/{m}" for m in METRICS}
    assert first.metrics != second.metrics


def test_column_and_multi_column_labels(digits: Digits, tmp_path: Path) -> None:
    """(B, 1) labels train and validate as (B,); (B, L) labels reach a calculator with a
    label_comparison_fn as they are."""
    from pml_margins.evaluation import RetrievalAccuracyCalculator

    def as_columns(x, y, width):
        labels = y.unsqueeze(1) if width == 1 else torch.stack([y, y % 2], 1)
        return torch.utils.data.TensorDataset(x, labels)

    train = DataLoader(as_columns(digits.x_train, digits.y_train, 1), batch_size=64)
    val = DataLoader(as_columns(digits.x_test, digits.y_test, 2), batch_size=128)
    same_digit = lambda a, b: a[..., 0] == b[..., 0]  # noqa: E731
    calc = RetrievalAccuracyCalculator(include=("precision_at_1",), label_comparison_fn=same_digit)
    callback = RetrievalMetricsCallback(accuracy_calculator=calc)
    trainer = make_trainer(tmp_path, callback, max_epochs=1)
    trainer.fit(MetricLearningModule(mlp(), arcface(), lr=1e-2), train, val)
    assert 0 < callback.metrics["precision_at_1"] <= 1


def test_the_optimizers_own_weight_decay_applies_unless_given() -> None:
    import functools

    sgd = functools.partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4)
    module = MetricLearningModule(mlp(), arcface(), optimizer=sgd)
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert groups["backbone"]["weight_decay"] == 5e-4 and groups["loss"]["weight_decay"] == 0
    adamw = MetricLearningModule(mlp(), arcface(), optimizer=torch.optim.AdamW)
    groups = {g["name"]: g for g in adamw.configure_optimizers().param_groups}
    assert groups["backbone"]["weight_decay"] == 0.01
    given = MetricLearningModule(mlp(), arcface(), optimizer=sgd, weight_decay=1e-3)
    assert given.configure_optimizers().param_groups[0]["weight_decay"] == 1e-3


def test_two_callbacks_under_one_name_are_refused(digits: Digits, tmp_path: Path) -> None:
    """Two callbacks with the default prefix logged one name each epoch: Lightning logged
    the mean of the two sets (0.3167 and 0.3125 as 0.3146), with no warning."""
    train, val = loaders(digits)
    trainer = make_trainer(tmp_path, RetrievalMetricsCallback(dataloader_idx=0), max_epochs=1)
    trainer.callbacks.append(RetrievalMetricsCallback(dataloader_idx=1))
    with pytest.raises(ValueError, match=r"log \['map_at_r', 'precision_at_1'"):
        trainer.fit(MetricLearningModule(mlp(), arcface()), train, [val, val])


def test_two_callbacks_with_disjoint_names_are_accepted(digits: Digits, tmp_path: Path) -> None:
    """Only a shared name clashes (a first version compared the prefixes)."""
    train, val = loaders(digits)
    first = RetrievalMetricsCallback(include=("precision_at_1",))
    second = RetrievalMetricsCallback(include=("r_precision",), dataloader_idx=1)
    trainer = make_trainer(tmp_path, first, max_epochs=1, limit_train_batches=1)
    trainer.callbacks.append(second)
    trainer.fit(MetricLearningModule(mlp(), arcface()), train, [val, val])
    assert set(first.metrics) == {"precision_at_1"} and set(second.metrics) == {"r_precision"}


def test_a_dataloader_that_is_not_there_is_refused(digits: Digits, tmp_path: Path) -> None:
    """dataloader_idx=1 with one validation loader logged nothing, silently."""
    train, val = loaders(digits)
    callback = RetrievalMetricsCallback(dataloader_idx=1)
    trainer = make_trainer(tmp_path, callback, max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"dataloader_idx=1.*1 dataloader"):
        trainer.fit(MetricLearningModule(mlp(), arcface()), train, val)


def test_callback_arguments_are_checked_at_construction() -> None:
    """prefix=3 failed after the first epoch (int + str); a negative or str index logged
    nothing; recall_ks=5 or None was Python's 'not iterable'."""
    with pytest.raises(TypeError, match="prefix must be a str"):
        RetrievalMetricsCallback(prefix=3)
    for index in (-1, "0", 1.0, True):
        with pytest.raises(ValueError, match="dataloader_idx must be an integer >= 0"):
            RetrievalMetricsCallback(dataloader_idx=index)
    for ks in (5, None, "12", (0, 1)):
        with pytest.raises(ValueError, match="recall_ks must be a sequence"):
            RetrievalMetricsCallback(recall_ks=ks)
    assert RetrievalMetricsCallback(recall_ks=(4, 1, 4)).calculator.recall_ks == (1, 4)


def test_trainer_test_gives_the_test_sets_metrics(digits: Digits, tmp_path: Path) -> None:
    """``trainer.test`` with the callback: the metrics of the test loader, as a brute
    calculation on the backbone's embeddings gives them (the module had no ``test_step``:
    Lightning refused ``trainer.test``)."""
    torch.manual_seed(0)
    module = MetricLearningModule(mlp(), arcface())
    callback = RetrievalMetricsCallback(prefix="test/", test=True)
    results = make_trainer(tmp_path, callback).test(module, loaders(digits)[1], verbose=False)

    with torch.no_grad():
        embeddings = module.backbone(digits.x_test)
    expected = RetrievalMetricsCallback().calculator.get_accuracy(embeddings, digits.y_test)
    for name, value in expected.items():
        logged = "test/" + {"mean_average_precision_at_r": "map_at_r"}.get(name, name)
        assert callback.metrics[logged] == pytest.approx(value, abs=1e-12)
        assert results[0][logged] == pytest.approx(value, abs=1e-6)


def test_trainer_test_under_ddp_equals_one_process(digits: Digits, tmp_path: Path) -> None:
    """Two CPU ranks (gloo) on 61 test rows: the test loader's DistributedSampler padding
    is dropped as the validation loader's is."""
    torch.manual_seed(0)
    module = MetricLearningModule(mlp(), arcface())
    test = DataLoader(
        torch.utils.data.TensorDataset(digits.x_test[:61], digits.y_test[:61]), batch_size=16
    )
    single = RetrievalMetricsCallback(test=True)
    make_trainer(tmp_path / "single", single).test(module, test, verbose=False)
    ddp = make_trainer(
        tmp_path / "ddp", RetrievalMetricsCallback(test=True), devices=2, strategy="ddp_fork"
    )
    ddp.test(module, test, verbose=False)
    for name, value in single.metrics.items():
        assert float(ddp.callback_metrics[name]) == pytest.approx(value, abs=1e-6), name


def test_float64_embeddings_are_evaluated_in_float64(digits: Digits, tmp_path: Path) -> None:
    """A float64 model's embeddings reach the calculator as they are (they were cast to
    float32, which can reorder near ties)."""
    seen: list[torch.dtype] = []
    callback = RetrievalMetricsCallback(include=("precision_at_1",))
    get_accuracy = callback.calculator.get_accuracy

    def spy(embeddings: torch.Tensor, *args: object, **kwargs: object) -> dict:
        seen.append(embeddings.dtype)
        return get_accuracy(embeddings, *args, **kwargs)

    callback.calculator.get_accuracy = spy
    backbone = mlp().double()
    data = torch.utils.data.TensorDataset(digits.x_test.double(), digits.y_test)
    make_trainer(tmp_path, callback).validate(
        MetricLearningModule(backbone, arcface().double()), DataLoader(data, 128), verbose=False
    )
    assert seen == [torch.float64]


class _OwnTestLoop(MetricLearningModule):
    """A module with its own test loop on unlabelled batches."""

    def test_step(self, batch: object, batch_idx: int) -> None:
        (inputs,) = batch
        self.log("test_norm", self(inputs).norm(dim=1).mean())


def test_a_callback_made_for_validation_leaves_a_modules_test_loop_alone(
    digits: Digits, tmp_path: Path
) -> None:
    """Without test=True the callback neither reads test batches (unlabelled ones raised
    'batches must be (inputs, labels, ...)'), nor checks its dataloader_idx against the
    test loaders, nor logs validation-prefixed metrics into the test results."""
    unlabelled = DataLoader(torch.utils.data.TensorDataset(digits.x_test), batch_size=64)
    callback = RetrievalMetricsCallback(prefix="val/", dataloader_idx=1)
    results = make_trainer(tmp_path, callback).test(
        _OwnTestLoop(mlp(), arcface()), unlabelled, verbose=False
    )
    assert set(results[0]) == {"test_norm"} and callback.metrics == {}
    with pytest.raises(TypeError, match="test must be a bool"):
        RetrievalMetricsCallback(test="yes")
