"""PML's own trainers and tester, driven by the dicts and tester of pml_margins.adapters."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.trainers import MetricLossOnly, TrainWithClassifier

from pml_margins.adapters import TrainerOptimizers, retrieval_tester, trainer_optimizers
from pml_margins.losses import ArcFaceLoss, CircleLoss
from tests.adapters.conftest import Digits, changed, mlp, params_copy

EMB = 32
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
CPU = torch.device("cpu")

# PML's trainer formats the loss tensor for its progress bar (not our code)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def arcface(num_classes: int = 10) -> ArcFaceLoss:
    return ArcFaceLoss(num_classes=num_classes, embedding_size=EMB, margin=0.3, scale=16.0)


# --- trainer_optimizers ---------------------------------------------------------------
def test_optimizer_keys_and_learning_rates() -> None:
    loss = arcface()
    models = {
        "trunk": mlp(),
        "embedder": torch.nn.Identity(),
        "classifier": torch.nn.Linear(EMB, 10),
    }
    losses = {"metric_loss": loss, "classifier_loss": torch.nn.CrossEntropyLoss()}
    opt = trainer_optimizers(models, losses, lr=1e-3, loss_lr=1e-2, optimizer=torch.optim.SGD)
    assert isinstance(opt, TrainerOptimizers)
    # no optimizer for modules without parameters (identity embedder, cross-entropy)
    assert sorted(opt.optimizers) == [
        "classifier_optimizer",
        "metric_loss_optimizer",
        "trunk_optimizer",
    ]
    assert opt.lr_schedulers == {}
    metric_opt = opt.optimizers["metric_loss_optimizer"]
    assert isinstance(metric_opt, torch.optim.SGD)
    assert metric_opt.param_groups[0]["params"] == [loss.W]
    assert metric_opt.param_groups[0]["lr"] == 1e-2
    assert opt.optimizers["trunk_optimizer"].param_groups[0]["lr"] == 1e-3


def test_optimizer_kwargs_reach_every_optimizer() -> None:
    """``optimizer_kwargs`` (weight decay, momentum) go to the models' and the losses'
    optimizers alike (found by review: untested, dropping them passed)."""
    models = {"trunk": mlp()}
    losses = {"metric_loss": arcface()}
    kwargs = {"weight_decay": 5e-4, "momentum": 0.9}
    opt = trainer_optimizers(models, losses, optimizer=torch.optim.SGD, optimizer_kwargs=kwargs)
    for optimizer in opt.optimizers.values():
        group = optimizer.param_groups[0]
        assert (group["weight_decay"], group["momentum"]) == (5e-4, 0.9)


def test_retrieval_tester_uses_the_calculator_given() -> None:
    """``accuracy_calculator=`` replaces the default one (found by review: untested)."""
    from pml_margins.evaluation import RetrievalAccuracyCalculator

    mine = RetrievalAccuracyCalculator(include=("precision_at_1",), k=3)
    assert retrieval_tester(accuracy_calculator=mine).accuracy_calculator is mine
    default = retrieval_tester(recall_ks=(1, 5)).accuracy_calculator
    assert default is not mine and "recall_at_5" in default.get_curr_metrics()


def test_retrieval_calculator_ranks_by_cosine_similarity() -> None:
    """Neighbours by angle, not by Euclidean distance (found by review: nothing pinned
    the distance). Query (1, 0): the reference (10, 1) is its nearest by angle, (0.6,
    0.6) by Euclidean distance; their labels tell which one the calculator took."""
    from pml_margins.adapters import retrieval_calculator

    query = torch.tensor([[1.0, 0.0]])
    reference = torch.tensor([[10.0, 1.0], [0.6, 0.6]])
    calculator = retrieval_calculator(recall_ks=(1,), include=("precision_at_1",))
    got = calculator.get_accuracy(query, torch.tensor([0]), reference, torch.tensor([0, 1]))
    assert got["precision_at_1"] == 1.0


def test_frozen_parameters_get_no_optimizer() -> None:
    trunk, embedder = mlp(), torch.nn.Linear(EMB, 8)
    embedder.requires_grad_(False)
    opt = trainer_optimizers({"trunk": trunk, "embedder": embedder}, {"metric_loss": arcface()})
    assert "embedder_optimizer" not in opt.optimizers


def test_a_module_under_two_keys_is_refused() -> None:
    """The same loss as metric_loss_0 and metric_loss_1 got two optimizers over one W,
    which PML then stepped twice an iteration with two Adam states (found by review)."""
    loss, trunk = arcface(), mlp()
    with pytest.raises(ValueError, match="metric_loss_1 and metric_loss_0 share parameters"):
        trainer_optimizers({"trunk": trunk}, {"metric_loss_0": loss, "metric_loss_1": loss})
    with pytest.raises(ValueError, match="embedder and trunk share parameters"):
        trainer_optimizers({"trunk": trunk, "embedder": trunk}, {"metric_loss": loss})


@pytest.mark.parametrize("step", ["iteration", "epoch", "plateau"])
def test_scheduler_keys(step: str) -> None:
    opt = trainer_optimizers(
        {"trunk": mlp()},
        {"metric_loss": arcface()},
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1),
        scheduler_step=step,
    )
    assert sorted(opt.lr_schedulers) == [
        f"metric_loss_scheduler_by_{step}",
        f"trunk_scheduler_by_{step}",
    ]
    assert (
        opt.lr_schedulers[f"trunk_scheduler_by_{step}"].optimizer
        is opt.optimizers["trunk_optimizer"]
    )


@pytest.mark.parametrize(
    ("models", "losses", "kwargs", "match"),
    [
        ({"backbone": None}, {}, {}, "models keys must be among"),
        ({"trunk": None}, {"arcface": None}, {}, "loss_funcs keys must be among"),
        ({"embedder": None}, {}, {}, "must contain a 'trunk'"),
        ({"trunk": None}, {}, {"scheduler_step": "batch"}, "scheduler_step"),
        ({"trunk": None}, {}, {"lr": 0.0}, "lr must be > 0"),
        ({"trunk": None}, {}, {"loss_lr": -1.0}, "loss_lr must be > 0"),
    ],
)
def test_bad_arguments(models: dict, losses: dict, kwargs: dict, match: str) -> None:
    models = {k: mlp() if v is None else v for k, v in models.items()}
    losses = {k: arcface() for k in losses}
    with pytest.raises(ValueError, match=match):
        trainer_optimizers(models, losses, **kwargs)


# --- end to end: PML trainers + our tester on the digits -----------------------------
def _test_accuracies(digits: Digits, trunk: torch.nn.Module) -> dict[str, float]:
    tester = retrieval_tester(data_device=CPU)
    result = tester.test(
        {"train": digits.train_set(), "test": digits.test_set()},
        epoch=1,
        trunk_model=trunk,
        splits_to_eval=[("test", ["train"])],
    )
    return result["test"]


def _assert_retrieval(accuracies: dict[str, float]) -> None:
    recalls = [accuracies[f"recall_at_{k}_level0"] for k in (1, 2, 4, 8)]
    others = [accuracies[f"{name}_level0"] for name in METRICS]
    for value in (*recalls, *others):
        assert 0.0 <= value <= 1.0 and math.isfinite(value)
    assert recalls == sorted(recalls)  # Recall@K grows with K
    assert recalls[0] == pytest.approx(accuracies["precision_at_1_level0"])
    # a trained MLP retrieves digits well (kNN on the raw pixels already does)
    assert recalls[0] > 0.85


def test_metric_loss_only_with_arcface(digits: Digits) -> None:
    trunk, loss = mlp(), arcface()
    models, losses = {"trunk": trunk}, {"metric_loss": loss}
    opt = trainer_optimizers(
        models,
        losses,
        lr=1e-3,
        loss_lr=1e-2,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    w_before, trunk_before = loss.W.detach().clone(), params_copy(trunk)
    trainer = MetricLossOnly(
        models=models,
        optimizers=opt.optimizers,
        lr_schedulers=opt.lr_schedulers,
        batch_size=64,
        loss_funcs=losses,
        dataset=digits.train_set(),
        iterations_per_epoch=15,
        dataloader_num_workers=0,
        data_device=CPU,
    )
    trainer.train(num_epochs=2)

    assert not torch.equal(loss.W.detach(), w_before)  # the class weights were trained
    assert changed(trunk_before, trunk)
    assert opt.optimizers["metric_loss_optimizer"].param_groups[0]["lr"] == pytest.approx(2.5e-3)
    _assert_retrieval(_test_accuracies(digits, trunk))


def test_train_with_classifier_with_arcface(digits: Digits) -> None:
    trunk, embedder, classifier = (
        mlp(embedding_size=48),
        torch.nn.Linear(48, EMB),
        torch.nn.Linear(EMB, 10),
    )
    loss = arcface()
    models = {"trunk": trunk, "embedder": embedder, "classifier": classifier}
    losses = {"metric_loss": loss, "classifier_loss": torch.nn.CrossEntropyLoss()}
    opt = trainer_optimizers(models, losses, lr=1e-3, loss_lr=1e-2)
    w_before, classifier_before = loss.W.detach().clone(), params_copy(classifier)
    trainer = TrainWithClassifier(
        models=models,
        optimizers=opt.optimizers,
        batch_size=64,
        loss_funcs=losses,
        loss_weights={"metric_loss": 1.0, "classifier_loss": 0.5},
        dataset=digits.train_set(),
        iterations_per_epoch=15,
        dataloader_num_workers=0,
        data_device=CPU,
    )
    trainer.train(num_epochs=1)

    assert not torch.equal(loss.W.detach(), w_before)
    assert changed(classifier_before, classifier)
    full = torch.nn.Sequential(trunk, embedder)
    _assert_retrieval(_test_accuracies(digits, full))


def _m_per_class(digits: Digits, iterations: int) -> MPerClassSampler:
    """Batches of 64 with 8 samples of each of 8 classes: positives for a pair loss."""
    return MPerClassSampler(
        digits.y_train, m=8, batch_size=64, length_before_new_iter=64 * iterations
    )


def test_metric_loss_only_with_circle_and_miner(digits: Digits) -> None:
    trunk = mlp()
    models, losses = {"trunk": trunk}, {"metric_loss": CircleLoss(m=0.25, gamma=64)}
    opt = trainer_optimizers(models, losses, lr=1e-3)
    assert sorted(opt.optimizers) == ["trunk_optimizer"]  # Circle has no parameters
    miner = MultiSimilarityMiner(epsilon=0.1)
    trunk_before = params_copy(trunk)
    trainer = MetricLossOnly(
        models=models,
        optimizers=opt.optimizers,
        batch_size=64,
        loss_funcs=losses,
        mining_funcs={"tuple_miner": miner},
        dataset=digits.train_set(),
        sampler=_m_per_class(digits, 15),
        dataloader_num_workers=0,
        data_device=CPU,
    )
    trainer.train(num_epochs=1)

    assert trainer.iterations_per_epoch == 15
    assert miner.num_pos_pairs > 0 and miner.num_neg_pairs > 0  # the miner fed the loss
    assert changed(trunk_before, trunk)
    _assert_retrieval(_test_accuracies(digits, trunk))


def test_train_with_classifier_with_circle_and_miner(digits: Digits) -> None:
    trunk, classifier = mlp(), torch.nn.Linear(EMB, 10)
    models = {"trunk": trunk, "classifier": classifier}
    losses = {"metric_loss": CircleLoss(), "classifier_loss": torch.nn.CrossEntropyLoss()}
    opt = trainer_optimizers(models, losses, lr=1e-3)
    trunk_before, classifier_before = params_copy(trunk), params_copy(classifier)
    trainer = TrainWithClassifier(
        models=models,
        optimizers=opt.optimizers,
        batch_size=64,
        loss_funcs=losses,
        mining_funcs={"tuple_miner": MultiSimilarityMiner(epsilon=0.1)},
        dataset=digits.train_set(),
        sampler=_m_per_class(digits, 15),
        dataloader_num_workers=0,
        data_device=CPU,
    )
    trainer.train(num_epochs=1)

    assert changed(trunk_before, trunk)
    assert changed(classifier_before, classifier)  # the classifier's class weights
    _assert_retrieval(_test_accuracies(digits, trunk))


def test_a_wrong_key_is_what_pml_rejects(digits: Digits) -> None:
    """Why the helper exists: PML's own error for an optimizer named after the loss class."""
    trunk, loss = mlp(), arcface()
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters()),
        "arcface_optimizer": torch.optim.Adam(loss.parameters()),
    }
    with pytest.raises(AssertionError):
        MetricLossOnly(
            models={"trunk": trunk},
            optimizers=optimizers,
            batch_size=64,
            loss_funcs={"metric_loss": loss},
            dataset=digits.train_set(),
            dataloader_num_workers=0,
            data_device=CPU,
        )


def test_keys_of_pmls_other_trainers_are_accepted() -> None:
    """CascadedEmbeddings' numbered keys and DeepAdversarialMetricLearning's generator."""
    from pml_margins.losses import ArcFaceLoss

    models = {"trunk": torch.nn.Linear(4, 4), "classifier_0": torch.nn.Linear(4, 3),
              "generator": torch.nn.Linear(4, 4)}  # fmt: skip
    losses = {"metric_loss_0": ArcFaceLoss(3, 4), "synth_loss": ArcFaceLoss(3, 4)}
    opt = trainer_optimizers(models, losses)
    assert {"metric_loss_0_optimizer", "classifier_0_optimizer"} <= set(opt.optimizers)
    with pytest.raises(ValueError, match="numbered"):
        trainer_optimizers({"trunk": torch.nn.Linear(4, 4)}, {"metric_loss_x": ArcFaceLoss(3, 4)})


def test_numbered_keys_belong_to_their_own_dict() -> None:
    """A loss's numbered key in models (or a model's in loss_funcs) was accepted, and PML's
    trainer then stopped on its AssertionError."""
    from pml_margins.losses import ArcFaceLoss

    trunk = torch.nn.Linear(4, 4)
    for key in ("metric_loss_0", "classifier_loss_1"):
        with pytest.raises(ValueError, match=r"models keys.*e\.g\. classifier_0"):
            trainer_optimizers({"trunk": trunk, key: torch.nn.Linear(4, 4)}, {})
    with pytest.raises(ValueError, match=r"loss_funcs keys.*e\.g\. metric_loss_0"):
        trainer_optimizers({"trunk": trunk}, {"classifier_2": ArcFaceLoss(3, 4)})


def test_import_star_imports_no_framework() -> None:
    """``import *`` takes the names of the adapters that need no extra (it imported
    Lightning and sentence-transformers, and failed where one was missing)."""
    import pml_margins.adapters as adapters

    modules = {adapters._LAZY[name] for name in adapters.__all__}
    assert modules == {"pml_trainers", "retrieval"}
    assert {"MetricLearningModule", "MetricLoss"} <= set(dir(adapters))
